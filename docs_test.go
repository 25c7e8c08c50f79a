package comfyume_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	// The module root alone registers comfyume's modules (modules.go), as
	// `xcaddy build --with github.com/comfyume/comfyume` relies on.
	_ "github.com/comfyume/comfyume"
	"github.com/comfyume/comfyume/comfytest"
)

// Importing the module root, and nothing of comfyume but it, registers
// every comfyume Caddy module. (TestXcaddyBuild checks the same through a
// real xcaddy build.)
func TestModuleRootRegistersModules(t *testing.T) {
	for _, id := range []string{"comfyume", "http.handlers.comfyume", "http.handlers.comfyume_worker"} {
		if _, err := caddy.GetModule(id); err != nil {
			t.Errorf("module %s is not registered by importing github.com/comfyume/comfyume: %v", id, err)
		}
	}
}

// snippet is one Caddyfile in the documentation: a ```caddyfile block of
// a Markdown file, or a whole Caddyfile shipped in examples/.
type snippet struct {
	where string // file:line
	text  string
}

var fenceOpen = regexp.MustCompile("^([ \t]*)```caddyfile[ \t]*$")

// markdownSnippets returns the ```caddyfile blocks of a Markdown file, each
// without the indentation of its fence (a block inside a list item).
func markdownSnippets(name string, md []byte) ([]snippet, error) {
	var out []snippet
	lines := strings.Split(string(md), "\n")
	for i := 0; i < len(lines); i++ {
		m := fenceOpen.FindStringSubmatch(lines[i])
		if m == nil {
			continue
		}
		indent, start := m[1], i+1
		var body []string
		for i++; ; i++ {
			if i == len(lines) {
				return nil, fmt.Errorf("%s:%d: unclosed ```caddyfile block", name, start)
			}
			if strings.TrimSpace(lines[i]) == "```" {
				break
			}
			line := lines[i]
			if strings.TrimSpace(line) != "" {
				if !strings.HasPrefix(line, indent) {
					return nil, fmt.Errorf("%s:%d: line less indented than its fence", name, i+1)
				}
				line = line[len(indent):]
			}
			body = append(body, line)
		}
		out = append(out, snippet{fmt.Sprintf("%s:%d", name, start), strings.Join(body, "\n") + "\n"})
	}
	return out, nil
}

// checkSnippet is what a user gets pasting the snippet: it must be as
// `caddy fmt` writes it and adapt with comfyume's modules.
func checkSnippet(s snippet) error {
	if f := caddyfile.Format([]byte(s.text)); !bytes.Equal(bytes.TrimSpace(f), bytes.TrimSpace([]byte(s.text))) {
		return fmt.Errorf("%s: not `caddy fmt`-clean; caddy fmt writes:\n%s", s.where, f)
	}
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(s.text), map[string]any{"filename": s.where})
	if err != nil {
		return fmt.Errorf("%s: does not adapt: %v", s.where, err)
	}
	// Provisioning (what `caddy validate` does) needs the servers a shared
	// store names; without them, adapting is the check.
	// Nor does it create directories the snippet names on this machine.
	if strings.Contains(s.text, "store valkey") || strings.Contains(s.text, "outputs s3") || strings.Contains(s.text, "outputs disk /") {
		return nil
	}
	var c caddy.Config
	if err := json.Unmarshal(cfg, &c); err != nil {
		return fmt.Errorf("%s: %v", s.where, err)
	}
	if err := caddy.Validate(&c); err != nil {
		return fmt.Errorf("%s: does not validate: %v", s.where, err)
	}
	return nil
}

func documentedCaddyfiles(t *testing.T) []snippet {
	t.Helper()
	mds, _ := filepath.Glob("examples/*/README.md")
	mds = append([]string{"README.md", "SECURITY.md"}, mds...)
	var all []snippet
	for _, md := range mds {
		b, err := os.ReadFile(md)
		if err != nil {
			t.Fatal(err)
		}
		s, err := markdownSnippets(md, b)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, s...)
	}
	files, _ := filepath.Glob("examples/*/*Caddyfile*")
	files = append(files, "Caddyfile")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, snippet{f, string(b)})
	}
	return all
}

// Every Caddyfile the documentation shows — each ```caddyfile block of
// README.md, SECURITY.md and examples/*/README.md, and every Caddyfile in
// examples/ — works as pasted: `caddy fmt` leaves it alone and Caddy's
// Caddyfile adapter takes it, with comfyume's modules.
func TestDocumentedCaddyfilesWorkAsPasted(t *testing.T) {
	t.Setenv("XDG_DATA_HOME", t.TempDir()) // outputs disk creates its directory
	// Parse-time environment placeholders ({$VAR}) the examples use.
	t.Setenv("PORT", "8081")
	// examples/workshop/worker.Caddyfile's, as Dockerfile.gpu sets it.
	t.Setenv("COMFYUI_COMMAND", "python3 /opt/ComfyUI/main.py --listen 127.0.0.1 --port 8188")
	all := documentedCaddyfiles(t)
	if len(all) < 9 {
		t.Fatalf("found only %d Caddyfiles in the documentation", len(all))
	}
	for _, s := range all {
		if err := checkSnippet(s); err != nil {
			t.Error(err)
		}
	}
}

// The README's first example is the one people paste. Run as written
// (only its ports moved, to a fake home and GPU ComfyUI), it lets its user
// in and asks strangers to log in, rather than refusing everyone with an
// empty 403. (Its hash has bcrypt cost 10, not hash-password's 14: a check
// at cost 14 takes over a minute under the race detector.)
func TestFirstReadmeExampleLetsItsUserIn(t *testing.T) {
	b, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	s, err := markdownSnippets("README.md", b)
	if err != nil || len(s) == 0 {
		t.Fatalf("no caddyfile block in README.md (%v)", err)
	}
	home := comfytest.Start(t, comfytest.Options{Version: "2026"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026"})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	site := l.Addr().String()
	l.Close()
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	hostport := func(u string) string { return strings.TrimPrefix(u, "http://") }
	cf := strings.NewReplacer(
		"127.0.0.1:8188", hostport(home.URL()),
		"127.0.0.1:8189", hostport(gpu.URL()),
		":8080 {", "http://"+site+" {",
	).Replace(s[0].text)
	cf = strings.Replace(cf, "{\n", "{\n\tadmin off\n", 1)
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	if err != nil {
		t.Fatalf("%s: %v", s[0].where, err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = caddy.Stop() })

	get := func(user, pass string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+site+"/api/jobs", nil)
		if user != "" {
			req.SetBasicAuth(user, pass)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	if code, body := get("alice", "alice-password"); code != 200 || !strings.Contains(body, `"jobs"`) {
		t.Errorf("alice, with the password the README names: %d %s", code, body)
	}
	if code, _ := get("", ""); code != 401 {
		t.Errorf("no credentials: %d, want 401 (a login prompt)", code)
	}
}

// The checks above catch what they are for: a block that is not
// fmt-clean, one that does not adapt, and one left open.
func TestSnippetCheckCatchesBrokenSnippets(t *testing.T) {
	md := "text\n\n  ```caddyfile\n  :8080 {\n  \tcomfyume {\n  \t\thome http://127.0.0.1:8188\n  \t}\n  }\n  ```\n"
	s, err := markdownSnippets("ok.md", []byte(md))
	if err != nil || len(s) != 1 {
		t.Fatalf("indented block: %v %v", s, err)
	}
	if err := checkSnippet(s[0]); err != nil {
		t.Errorf("a good indented block is refused: %v", err)
	}
	for name, text := range map[string]string{
		"unformatted":          ":8080 {\n    comfyume\n}\n",
		"unknown subdirective": ":8080 {\n\tcomfyume {\n\t\tshoe_size 42\n\t}\n}\n",
		"unknown global":       "{\n\tcomfyume {\n\t\tcolour blue\n\t}\n}\n",
	} {
		if err := checkSnippet(snippet{name, text}); err == nil {
			t.Errorf("%s snippet passes the check", name)
		}
	}
	if _, err := markdownSnippets("open.md", []byte("```caddyfile\n:8080\n")); err == nil {
		t.Error("an unclosed block passes")
	}
}
