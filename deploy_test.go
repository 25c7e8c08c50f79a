package comfyume_test

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/comfyume/comfyume/comfytest"
)

// unitFile reads a systemd unit: section → key → values (a key may repeat).
func unitFile(t *testing.T, path string) map[string]map[string][]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u := map[string]map[string][]string{}
	section := ""
	for n, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not a unit line: %q", path, n+1, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// caddyArgs parses a command line of the Caddy binary the way Caddy's own
// subcommand does, and returns its flags.
func caddyArgs(t *testing.T, line string) (bin, sub string, flags *cobra.Command) {
	t.Helper()
	argv := strings.Fields(line)
	if len(argv) < 2 {
		t.Fatalf("command line %q", line)
	}
	c, ok := caddycmd.Commands()[argv[1]]
	if !ok {
		t.Fatalf("%q: Caddy has no subcommand %q", line, argv[1])
	}
	cmd := &cobra.Command{Use: c.Name}
	c.CobraFunc(cmd)
	if err := cmd.ParseFlags(argv[2:]); err != nil {
		t.Fatalf("%q: %v", line, err)
	}
	if rest := cmd.Flags().Args(); len(rest) > 0 {
		t.Fatalf("%q: stray arguments %q", line, rest)
	}
	return argv[0], argv[1], cmd
}

// The systemd unit in examples/systemd starts and reloads Caddy with
// flags Caddy's run and reload commands take, on one absolute Caddyfile
// path (named Caddyfile, so its adapter is the Caddyfile's); it runs as an
// unprivileged user, tells systemd when Caddy is ready, and does not print
// its environment (the tokens) into the journal.
func TestSystemdUnitIsSane(t *testing.T) {
	u := unitFile(t, "examples/systemd/comfyume.service")
	svc := u["Service"]
	one := func(k string) string {
		if len(svc[k]) != 1 {
			t.Fatalf("[Service] %s: %q, want one", k, svc[k])
		}
		return svc[k][0]
	}
	bin, sub, run := caddyArgs(t, one("ExecStart"))
	if sub != "run" || !filepath.IsAbs(bin) {
		t.Errorf("ExecStart %q: want an absolute binary and `run`", one("ExecStart"))
	}
	config, _ := run.Flags().GetString("config")
	if !filepath.IsAbs(config) || filepath.Base(config) != "Caddyfile" {
		t.Errorf("ExecStart's --config %q: want an absolute path to a file named Caddyfile", config)
	}
	if environ, _ := run.Flags().GetBool("environ"); environ {
		t.Error("ExecStart has --environ: the journal would get every token of the environment")
	}
	rbin, rsub, reload := caddyArgs(t, one("ExecReload"))
	rconfig, _ := reload.Flags().GetString("config")
	if rbin != bin || rsub != "reload" || rconfig != config {
		t.Errorf("ExecReload %q does not reload %s's config %s", one("ExecReload"), bin, config)
	}
	if one("Type") != "notify" {
		t.Errorf("Type=%s: Caddy tells systemd when it is ready (notify)", one("Type"))
	}
	if user := one("User"); user == "" || user == "root" {
		t.Errorf("User=%q: run unprivileged", user)
	}
	if env := one("EnvironmentFile"); !filepath.IsAbs(strings.TrimPrefix(env, "-")) {
		t.Errorf("EnvironmentFile=%q", env)
	}
	if got := u["Install"]["WantedBy"]; len(got) != 1 || got[0] != "multi-user.target" {
		t.Errorf("[Install] WantedBy=%q", got)
	}
	// The README's Deploy section installs the binary where the unit runs it.
	readme, _ := os.ReadFile("README.md")
	if !strings.Contains(string(readme), bin) {
		t.Errorf("README.md never names %s, the binary the unit runs", bin)
	}
}

// Each replica of examples/two-replicas has its admin API on loopback, at
// the port its command line gives, so /comfyume/pools can be read.
func TestTwoReplicasAdminOnLoopback(t *testing.T) {
	b, err := os.ReadFile("examples/two-replicas/Caddyfile.replica")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("ADMIN_PORT", "2021")
	js, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(b, nil)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Admin struct {
			Disabled bool   `json:"disabled"`
			Listen   string `json:"listen"`
		} `json:"admin"`
	}
	if err := json.Unmarshal(js, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Disabled || cfg.Admin.Listen != "localhost:2021" {
		t.Errorf("replica admin: %+v, want localhost:2021", cfg.Admin)
	}
	readme, _ := os.ReadFile("examples/two-replicas/README.md")
	if !strings.Contains(string(readme), "ADMIN_PORT=2021") || !strings.Contains(string(readme), "localhost:2021/comfyume/pools") {
		t.Error("examples/two-replicas/README.md does not say how to reach a replica's /comfyume/pools")
	}
}

// The README's Caddy in front of a GPU ComfyUI (transport comfyui) lets
// through only requests with the gateway's token, and nobody when the
// token is unset.
func TestReadmeGPUGuardChecksTheToken(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	all, err := markdownSnippets("README.md", b)
	if err != nil {
		t.Fatal(err)
	}
	var guard string
	for _, s := range all {
		if strings.Contains(s.text, "@gateway") {
			guard = s.text
		}
	}
	if guard == "" {
		t.Fatal("README.md has no Caddyfile guarding a GPU ComfyUI (@gateway)")
	}
	comfy := comfytest.Start(t, comfytest.Options{Version: "2026"})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	site := l.Addr().String()
	l.Close()
	cf := strings.NewReplacer(":8189 {", "{\n\tadmin off\n}\n\nhttp://"+site+" {", "127.0.0.1:8188", strings.TrimPrefix(comfy.URL(), "http://")).Replace(guard)
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	if err != nil {
		t.Fatalf("%v\n%s", err, cf)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })
	status := func(auth string) int {
		req, _ := http.NewRequest("GET", "http://"+site+"/system_stats", nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	t.Setenv("GPU_TOKEN", "s3cret-token")
	for auth, want := range map[string]int{"Bearer s3cret-token": 200, "Bearer wrong": 401, "": 401, "Bearer ": 401, "s3cret-token": 401} {
		if got := status(auth); got != want {
			t.Errorf("GPU_TOKEN set, Authorization %q: %d, want %d", auth, got, want)
		}
	}
	t.Setenv("GPU_TOKEN", "")
	for _, auth := range []string{"Bearer ", "Bearer", ""} {
		if got := status(auth); got != 401 {
			t.Errorf("GPU_TOKEN unset, Authorization %q: %d, want 401", auth, got)
		}
	}
}
