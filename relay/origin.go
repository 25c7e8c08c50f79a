package relay

import (
	"net/http"
	"net/url"
	"strings"
)

// Cross-site requests.
//
// A page on any other site can make a visitor's browser send requests to
// the gateway — a form post, a no-cors fetch with a text/plain body, a
// WebSocket — and the browser adds whatever it holds for the gateway by
// itself: basic-auth credentials, cookies, a client certificate, or simply
// being on the network the gateway trusts. Newer ComfyUI refuses such
// requests in its origin_only_middleware (403, empty body); the gateway
// applies the same rule, once, to every request it answers or passes on, so
// a home behind it is protected whatever its version.

// CrossSite says why r must be refused as a request another site made the
// browser send, or "" when it may proceed:
//
//   - Sec-Fetch-Site: cross-site is refused (as newer ComfyUI does), except
//     a top-level GET or HEAD navigation to "/" — opening the UI from a link
//     or after an identity provider on another domain redirects back, which
//     cannot change anything (the exemption ComfyUI's own pull request 15557
//     makes);
//   - same-origin and none (typed URL, bookmark) are what the browser
//     vouches for and proceed;
//   - same-site, or no Sec-Fetch-Site at all (older browsers, scripts): an
//     Origin header, when there is one, must name the host the request was
//     sent to — the Host header, or X-Forwarded-Host / Forwarded host= set
//     by a proxy in front — compared as ComfyUI compares them (see
//     originMatches). A page can't set those headers on a
//     cross-origin request without a CORS preflight, which nothing here
//     grants. Unlike ComfyUI this comparison is not limited to loopback
//     hosts: the gateway is meant to be reached over a network.
//
// Scripts and API clients send neither Origin nor Sec-Fetch-Site and are
// never refused.
func CrossSite(r *http.Request) string {
	switch strings.ToLower(strings.TrimSpace(r.Header.Get("Sec-Fetch-Site"))) {
	case "same-origin", "none":
		return ""
	case "cross-site":
		if topLevelRootNavigation(r) {
			return ""
		}
		return "cross-site request (Sec-Fetch-Site: cross-site)"
	}
	origins := r.Header.Values("Origin")
	if len(origins) == 0 {
		return ""
	}
	hosts := requestHosts(r)
	for _, o := range origins {
		if !originMatches(o, hosts) {
			return "request with non matching host and origin " + strings.Join(hosts, ",") + " != " + o
		}
	}
	return ""
}

// allowedOrigin is CrossSite as a WebSocket upgrader's CheckOrigin.
func allowedOrigin(r *http.Request) bool { return CrossSite(r) == "" }

// topLevelRootNavigation reports a browser opening the UI's page itself.
func topLevelRootNavigation(r *http.Request) bool {
	return (r.Method == http.MethodGet || r.Method == http.MethodHead) &&
		r.URL != nil && r.URL.Path == "/" &&
		strings.EqualFold(r.Header.Get("Sec-Fetch-Mode"), "navigate") &&
		strings.EqualFold(r.Header.Get("Sec-Fetch-Dest"), "document")
}

// maxHosts bounds how many forwarded host values are considered.
const maxHosts = 8

// requestHosts lists the hosts the request was addressed to, lowercase: its
// Host, then what proxies in front recorded as the original host.
func requestHosts(r *http.Request) []string {
	hosts := []string{strings.ToLower(r.Host)}
	add := func(h string) {
		h = strings.ToLower(strings.Trim(strings.TrimSpace(h), `"`))
		if h != "" && len(hosts) < maxHosts {
			hosts = append(hosts, h)
		}
	}
	for _, v := range r.Header.Values("X-Forwarded-Host") {
		for _, h := range strings.Split(v, ",") {
			add(h)
		}
	}
	for _, v := range r.Header.Values("Forwarded") {
		for _, elem := range strings.Split(v, ",") {
			for _, pair := range strings.Split(elem, ";") {
				k, val, ok := strings.Cut(strings.TrimSpace(pair), "=")
				if ok && strings.EqualFold(k, "host") {
					add(val)
				}
			}
		}
	}
	return hosts
}

// originMatches compares an Origin header with the request's hosts the way
// ComfyUI's middleware does — lowercase, and a Host without a port (as a
// proxy may send it) is compared by name only — except that an Origin
// without a port means its scheme's default port, as browsers mean it.
// "null" and anything without a host match nothing.
func originMatches(origin string, hosts []string) bool {
	u, err := url.Parse(strings.TrimSpace(origin))
	if err != nil || u.Host == "" {
		return false
	}
	oHost, oPort := strings.ToLower(u.Hostname()), u.Port()
	if oHost == "" {
		return false
	}
	if oPort == "" {
		switch strings.ToLower(u.Scheme) {
		case "http", "ws":
			oPort = "80"
		case "https", "wss":
			oPort = "443"
		}
	}
	for _, h := range hosts {
		if h == "" {
			continue
		}
		hu := url.URL{Host: h}
		hHost, hPort := hu.Hostname(), hu.Port()
		if hHost != oHost {
			continue
		}
		if hPort == "" || hPort == oPort {
			return true
		}
	}
	return false
}
