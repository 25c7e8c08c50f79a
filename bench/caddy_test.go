package bench

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/comfyume/comfyume/caddymodule"
)

// caddyGlobals are the global options every benchmark config starts with:
// no admin endpoint, no autosaved config, only errors logged.
const caddyGlobals = `
	admin off
	persist_config off
	log {
		level ERROR
	}
`

func freePort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startCaddy adapts a Caddyfile and runs it in this process until the
// benchmark ends. Every "{PORT:name}" in the text is replaced by a free
// port; the ports are returned by name. "{DATA}" becomes a fresh
// directory. There is one running Caddy config per process, and the
// benchmarks run one after the other, so no locking is needed.
func startCaddy(tb testing.TB, caddyfile string) map[string]int {
	tb.Helper()
	ports := map[string]int{}
	for {
		i := strings.Index(caddyfile, "{PORT:")
		if i < 0 {
			break
		}
		j := strings.Index(caddyfile[i:], "}")
		name := caddyfile[i+len("{PORT:") : i+j]
		if _, ok := ports[name]; !ok {
			ports[name] = freePort(tb)
		}
		caddyfile = strings.ReplaceAll(caddyfile, "{PORT:"+name+"}", fmt.Sprint(ports[name]))
	}
	caddyfile = strings.ReplaceAll(caddyfile, "{DATA}", tb.TempDir())
	cfg, warn, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		tb.Fatalf("adapting Caddyfile: %v\n%s", err, caddyfile)
	}
	for _, w := range warn {
		tb.Logf("Caddyfile warning: %s", w.String())
	}
	if err := caddy.Load(cfg, true); err != nil {
		tb.Fatalf("loading config: %v", err)
	}
	tb.Cleanup(func() { _ = caddy.Stop() })
	for _, p := range ports {
		waitListening(tb, p)
	}
	return ports
}

func waitListening(tb testing.TB, port int) {
	tb.Helper()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	for i := 0; i < 200; i++ {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	tb.Fatalf("nothing listens on %s", addr)
}
