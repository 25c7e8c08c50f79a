package main

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

func freeAddr(t *testing.T, host string) string {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func isLoopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// The demo's configuration, as `comfyume demo` runs it by default, has
// the gateway's site and Caddy's admin endpoint on loopback addresses only.
func TestDemoConfigIsLoopbackOnly(t *testing.T) {
	c := defaultDemoConfig()
	for name, addr := range map[string]string{"listen": c.Listen, "home": c.HomeAddr, "gpu": c.GPUAddr, "admin": c.Admin} {
		if !isLoopback(addr) {
			t.Errorf("default %s address %q is not loopback", name, addr)
		}
	}
	cf, err := demoCaddyfile(c)
	if err != nil {
		t.Fatal(err)
	}
	js, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(cf, nil)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Admin struct {
			Listen string `json:"listen"`
		} `json:"admin"`
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Listen []string `json:"listen"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(js, &cfg); err != nil {
		t.Fatal(err)
	}
	if !isLoopback(cfg.Admin.Listen) {
		t.Errorf("admin listens on %q", cfg.Admin.Listen)
	}
	n := 0
	for name, srv := range cfg.Apps.HTTP.Servers {
		for _, l := range srv.Listen {
			n++
			if !isLoopback(l) {
				t.Errorf("server %s listens on %q, not only on loopback", name, l)
			}
		}
	}
	if n == 0 {
		t.Errorf("no listener in %s", js)
	}
}

// A running demo answers on loopback and on no other address of the
// machine, and a browser opening it (simulated home) reads what runs and
// how to put a real ComfyUI behind it, in a page that loads nothing.
func TestDemoServesLoopbackOnlyAndExplainsItself(t *testing.T) {
	c := defaultDemoConfig()
	host, _, _ := net.SplitHostPort(c.Listen)
	c.Listen = freeAddr(t, host) // the default host, a free port
	c.HomeAddr = freeAddr(t, "127.0.0.1")
	c.GPUAddr = freeAddr(t, "127.0.0.1")
	c.Admin = "off"
	c.Step = time.Millisecond
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	var log strings.Builder
	d, err := startDemo(c, &log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Stop)
	if !d.Simulated {
		t.Fatal("a ComfyUI answered on a port just picked")
	}
	for _, step := range []string{"[1/4] home", "[2/4] pool", "[3/4] gateway"} {
		if !strings.Contains(log.String(), step) {
			t.Errorf("the demo did not say %q:\n%s", step, log.String())
		}
	}

	t.Run("loopback only", func(t *testing.T) {
		_, port, _ := net.SplitHostPort(c.Listen)
		conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", port), 5*time.Second)
		if err != nil {
			t.Fatalf("the demo does not answer on loopback: %v", err)
		}
		conn.Close()
		addrs, _ := net.InterfaceAddrs()
		others := 0
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok || ipn.IP.IsLoopback() || ipn.IP.IsLinkLocalUnicast() {
				continue
			}
			others++
			for _, p := range []string{port, portOf(c.HomeAddr), portOf(c.GPUAddr)} {
				if conn, err := net.DialTimeout("tcp", net.JoinHostPort(ipn.IP.String(), p), 5*time.Second); err == nil {
					conn.Close()
					t.Errorf("port %s answers on %s, an address other machines can reach", p, ipn.IP)
				}
			}
		}
		if others == 0 {
			t.Log("this machine has no address but loopback: only loopback was dialled")
		}
	})

	t.Run("page", func(t *testing.T) {
		resp, err := http.Get("http://" + c.Listen + "/")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		page := string(body)
		if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
			t.Fatalf("GET / → %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		for _, want := range []string{
			"comfyume demo",
			"simulated",
			"home</b> at " + c.HomeAddr,
			"pool \"gpu\"</b> at " + c.GPUAddr,
			"python main.py --listen 127.0.0.1 --port " + portOf(c.HomeAddr),
			"go run ./cmd/comfyume demo",
			"go run ./cmd/comfyume run --config Caddyfile",
			"only answers this machine",
		} {
			if !strings.Contains(page, want) {
				t.Errorf("the page does not say %q:\n%s", want, page)
			}
		}
		if m := regexp.MustCompile(`(?i)<script|<link|<img|<iframe|\bsrc\s*=|\bhref\s*=|url\(|@import`).FindString(page); m != "" {
			t.Errorf("the page loads or links something (%q)", m)
		}
	})
}

func portOf(hostport string) string {
	_, p, _ := net.SplitHostPort(hostport)
	return p
}
