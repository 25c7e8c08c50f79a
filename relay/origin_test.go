package relay

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

type originCase struct {
	name   string
	method string
	target string // path, or absolute URL (sets Host)
	header []string
	refuse bool
}

var originCases = []originCase{
	// Scripts and API clients: no Origin, no fetch metadata.
	{name: "script POST", method: "POST", target: "http://gw.example/prompt"},
	{name: "script websocket", method: "GET", target: "http://gw.example/ws"},
	// What browsers vouch for.
	{name: "same-origin fetch", method: "POST", target: "http://gw.example/prompt", header: []string{"Sec-Fetch-Site", "same-origin", "Origin", "http://gw.example"}},
	{name: "same-origin behind a proxy that rewrote Host", method: "POST", target: "http://10.0.0.5:8080/prompt", header: []string{"Sec-Fetch-Site", "same-origin", "Origin", "https://comfy.example.com"}},
	{name: "typed URL", method: "GET", target: "http://gw.example/", header: []string{"Sec-Fetch-Site", "none"}},
	// Cross-site: refused, whatever the route or method.
	{name: "cross-site no-cors POST", method: "POST", target: "http://gw.example/prompt", header: []string{"Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "no-cors", "Origin", "http://evil.example"}, refuse: true},
	{name: "cross-site upload", method: "POST", target: "http://gw.example/upload/image", header: []string{"Sec-Fetch-Site", "Cross-Site"}, refuse: true},
	{name: "cross-site form post navigation", method: "POST", target: "http://gw.example/", header: []string{"Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Dest", "document", "Origin", "http://evil.example"}, refuse: true},
	{name: "cross-site websocket", method: "GET", target: "http://gw.example/ws", header: []string{"Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "websocket", "Origin", "http://evil.example"}, refuse: true},
	{name: "cross-site GET of an output", method: "GET", target: "http://gw.example/view?filename=a.png", header: []string{"Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "no-cors", "Sec-Fetch-Dest", "image"}, refuse: true},
	{name: "cross-site navigation into an iframe", method: "GET", target: "http://gw.example/", header: []string{"Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Dest", "iframe"}, refuse: true},
	{name: "cross-site navigation elsewhere than the UI", method: "GET", target: "http://gw.example/api/jobs", header: []string{"Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Dest", "document"}, refuse: true},
	// Opening the UI from a link or a login redirect on another domain.
	{name: "cross-site top-level navigation to the UI", method: "GET", target: "http://gw.example/?workflow=x", header: []string{"Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "navigate", "Sec-Fetch-Dest", "document"}},
	// Same-site pages (another port, a sibling subdomain) must match the host.
	{name: "same-site other port", method: "POST", target: "http://127.0.0.1:8080/prompt", header: []string{"Sec-Fetch-Site", "same-site", "Origin", "http://127.0.0.1:9090"}, refuse: true},
	{name: "same-site sibling", method: "POST", target: "https://comfy.corp.example/prompt", header: []string{"Sec-Fetch-Site", "same-site", "Origin", "https://wiki.corp.example"}, refuse: true},
	{name: "same-site default port", method: "POST", target: "http://127.0.0.1:8080/prompt", header: []string{"Sec-Fetch-Site", "same-site", "Origin", "http://127.0.0.1"}, refuse: true},
	// Browsers without fetch metadata: Origin against Host.
	{name: "old browser same origin", method: "POST", target: "http://127.0.0.1:8080/prompt", header: []string{"Origin", "http://127.0.0.1:8080"}},
	{name: "old browser same origin, case", method: "POST", target: "http://Gw.Example:8080/prompt", header: []string{"Origin", "http://gw.example:8080"}},
	{name: "old browser foreign origin", method: "POST", target: "http://127.0.0.1:8080/prompt", header: []string{"Origin", "http://evil.example"}, refuse: true},
	{name: "old browser other port", method: "POST", target: "http://127.0.0.1:8080/prompt", header: []string{"Origin", "http://127.0.0.1:9090"}, refuse: true},
	{name: "old browser null origin", method: "POST", target: "http://127.0.0.1:8080/prompt", header: []string{"Origin", "null"}, refuse: true},
	{name: "old browser garbage origin", method: "POST", target: "http://127.0.0.1:8080/prompt", header: []string{"Origin", "::"}, refuse: true},
	{name: "two origins, one foreign", method: "POST", target: "http://gw.example/prompt", header: []string{"Origin", "http://gw.example", "Origin", "http://evil.example"}, refuse: true},
	// Behind a TLS-terminating proxy: Host is the proxy's upstream address.
	{name: "X-Forwarded-Host", method: "POST", target: "http://10.0.0.5:8080/prompt", header: []string{"Origin", "https://comfy.example.com", "X-Forwarded-Host", "comfy.example.com"}},
	{name: "X-Forwarded-Host with port", method: "POST", target: "http://10.0.0.5:8080/prompt", header: []string{"Origin", "https://comfy.example.com", "X-Forwarded-Host", "comfy.example.com:443"}},
	{name: "X-Forwarded-Host chain", method: "POST", target: "http://10.0.0.5:8080/prompt", header: []string{"Origin", "https://comfy.example.com", "X-Forwarded-Host", "edge.internal, comfy.example.com"}},
	{name: "Forwarded host=", method: "POST", target: "http://10.0.0.5:8080/prompt", header: []string{"Origin", "https://comfy.example.com", "Forwarded", `for=1.2.3.4;host="comfy.example.com";proto=https`}},
	{name: "proxy host does not match", method: "POST", target: "http://10.0.0.5:8080/prompt", header: []string{"Origin", "https://evil.example", "X-Forwarded-Host", "comfy.example.com"}, refuse: true},
	{name: "HTTPS origin, host without port", method: "POST", target: "https://comfy.example.com/prompt", header: []string{"Origin", "https://comfy.example.com"}},
	{name: "IPv6 host", method: "POST", target: "http://[::1]:8080/prompt", header: []string{"Origin", "http://[::1]:8080"}},
	{name: "IPv6 other port", method: "POST", target: "http://[::1]:8080/prompt", header: []string{"Origin", "http://[::1]:8081"}, refuse: true},
}

func TestCrossSite(t *testing.T) {
	for _, c := range originCases {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest(c.method, c.target, nil)
			for i := 0; i+1 < len(c.header); i += 2 {
				r.Header.Add(c.header[i], c.header[i+1])
			}
			reason := CrossSite(r)
			if (reason != "") != c.refuse {
				t.Fatalf("CrossSite = %q, want refused=%v", reason, c.refuse)
			}
			if allowedOrigin(r) == c.refuse {
				t.Fatalf("the WebSocket check disagrees with CrossSite")
			}
		})
	}
}

// FuzzCrossSite: any Origin, Host and forwarded headers; never panics, and
// a request whose browser says cross-site is refused unless it opens the UI.
func FuzzCrossSite(f *testing.F) {
	for _, c := range originCases {
		var site, origin, xfh, fwd string
		for i := 0; i+1 < len(c.header); i += 2 {
			switch c.header[i] {
			case "Sec-Fetch-Site":
				site = c.header[i+1]
			case "Origin":
				origin = c.header[i+1]
			case "X-Forwarded-Host":
				xfh = c.header[i+1]
			case "Forwarded":
				fwd = c.header[i+1]
			}
		}
		host := "gw.example"
		if strings.HasPrefix(c.target, "http") {
			host = httptest.NewRequest("GET", c.target, nil).Host
		}
		f.Add(c.method, host, site, origin, xfh, fwd)
	}
	f.Add("POST", "[::1", "", "http://[::1", "[", "host=;;,")
	f.Fuzz(func(t *testing.T, method, host, site, origin, xfh, fwd string) {
		r := &http.Request{Method: method, Host: host, Header: http.Header{}, URL: &url.URL{Path: "/prompt"}}
		if site != "" {
			r.Header.Set("Sec-Fetch-Site", site)
		}
		if origin != "" {
			r.Header.Set("Origin", origin)
		}
		if xfh != "" {
			r.Header.Set("X-Forwarded-Host", xfh)
		}
		if fwd != "" {
			r.Header.Set("Forwarded", fwd)
		}
		reason := CrossSite(r)
		if strings.EqualFold(strings.TrimSpace(site), "cross-site") && reason == "" {
			t.Fatalf("cross-site POST /prompt allowed")
		}
		if site == "" && origin == "" && reason != "" {
			t.Fatalf("a script's request was refused: %s", reason)
		}
		if len(requestHosts(r)) > maxHosts {
			t.Fatalf("unbounded host list")
		}
	})
}

func TestActsOnEveryone(t *testing.T) {
	for p, want := range map[string]bool{
		"/internal/logs": true, "/api/internal/logs/raw": true, "/internal/files/output": true,
		"/api/free": true, "/free": true, "//internal/./logs": true, "/api/../internal/logs": true,
		"/internal":                    true,
		"/userdata/workflows%2Fa.json": false, "/settings": false, "/upload/image": false,
		"/freeze": false, "/internals": false, "/": false, "/api/userdata": false,
	} {
		r := httptest.NewRequest("POST", "http://gw.example"+p, nil)
		if got := ActsOnEveryone(r); got != want {
			t.Errorf("%s: %v, want %v", p, got, want)
		}
	}
}
