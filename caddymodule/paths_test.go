package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image/color"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/comfyume/comfyume/comfytest"
)

// nodeErrorOn asserts a ComfyUI 400 for a prompt that marks node (and says
// why in the node's error details).
func nodeErrorOn(t *testing.T, what string, st int, body []byte, node string) string {
	t.Helper()
	var pe struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
			Details string `json:"details"`
		} `json:"error"`
		NodeErrors map[string]struct {
			Errors []struct {
				Type    string `json:"type"`
				Details string `json:"details"`
			} `json:"errors"`
			ClassType string `json:"class_type"`
		} `json:"node_errors"`
	}
	if st != 400 || json.Unmarshal(body, &pe) != nil || pe.Error.Message == "" {
		t.Fatalf("%s: %d %.300s, want ComfyUI's 400", what, st, body)
	}
	ne, ok := pe.NodeErrors[node]
	if !ok || len(ne.Errors) == 0 || ne.Errors[0].Type != "custom_validation_failed" {
		t.Fatalf("%s: node %s not marked: %.300s", what, node, body)
	}
	return ne.Errors[0].Details
}

// Issue 8, finding 1: bob names alice's output through one of his own job
// folders ("comfyume/<bob's job>/../../<alice's job>/output/<file>"). The
// gateway refuses the value as ComfyUI refuses an invalid image file; alice's
// file never reaches the GPU; the same kind of path is refused on /view.
func TestClimbingValueCannotReachAnotherUsersOutput(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	alice := g.openBrowser("alice", "tab-a", true)
	bob := g.openBrowser("bob", "tab-b", true)

	a := g.queue("alice", alice.SID, samplerWorkflow("secret", 2))
	ref := outputRef(t, alice.untilJobEnd(a.PromptID, 30*time.Second), "3")
	st, secret, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 || len(secret) == 0 {
		t.Fatalf("alice's own output: %d", st)
	}
	b := g.queue("bob", bob.SID, samplerWorkflow("mine", 2))
	bob.untilJobEnd(b.PromptID, 30*time.Second)

	climb := fmt.Sprintf("comfyume/%s/../../%s/output/%s [output]", b.PromptID, a.PromptID, ref["filename"])
	steal := map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": climb}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "stolen"}},
	}
	st, body, _ := g.do("bob", "POST", "/api/prompt", map[string]any{"prompt": steal, "client_id": bob.SID})
	if details := nodeErrorOn(t, "climbing LoadImage", st, body, "1"); !strings.Contains(details, climb) {
		t.Errorf("error does not name the value: %s", details)
	}
	for _, u := range gpu.Uploads() {
		if bytes.Equal(u.Data, secret) {
			t.Fatalf("alice's output was uploaded for bob as %s/%s", u.Subfolder, u.Name)
		}
	}
	// The same spellings on /view are refused, even for the owner: one
	// spelling per file.
	for user, sub := range map[string]string{
		"bob":   fmt.Sprintf("comfyume/%s/../%s", b.PromptID, a.PromptID),
		"alice": fmt.Sprintf("comfyume/%s/../%s", a.PromptID, a.PromptID),
	} {
		st, _, _ := g.do(user, "GET", fmt.Sprintf("/api/view?filename=%s&subfolder=%s&type=output", ref["filename"], sub), nil)
		if st != 400 {
			t.Errorf("%s's /view of subfolder %s: %d, want 400", user, sub, st)
		}
	}
}

// Values with "..", ".", empty names or backslashes are refused at /prompt
// (ComfyUI's 400 on the node) and never reach the GPU's /upload/image, even
// when the user's home would serve the file behind them.
func TestDotDotValuesRefusedBeforeUpload(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	home.PutInput("", "cat.png", pngBytes(t, 4, 4, color.NRGBA{200, 10, 10, 255}))
	home.PutInput("k1", "cat.png", pngBytes(t, 4, 4, color.NRGBA{10, 200, 10, 255}))
	for _, v := range []string{"k1/../cat.png", "./cat.png", "k1//cat.png", "k1/./cat.png", `k1\..\cat.png`, "/cat.png",
		"comfyume/x/../../cat.png [output]"} {
		prompt := map[string]any{
			"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": v}},
			"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "x"}},
		}
		st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": prompt})
		nodeErrorOn(t, v, st, body, "1")
	}
	if n := len(gpu.Uploads()); n != 0 {
		t.Fatalf("%d uploads reached the GPU", n)
	}
}

// Issue 8, finding 4: 2000 spellings of one file through ".." are refused
// before anything is fetched; 2000 inputs naming one file in the spellings
// that are valid make one upload; a prompt naming more different files
// than the gateway forwards is refused before anything is fetched.
func TestManySpellingsOfOneInput(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	home.PutInput("", "pic.png", pngBytes(t, 4, 4, color.NRGBA{1, 2, 3, 255}))
	b := g.openBrowser("alice", "tab", true)
	homeViews := func() int {
		n := 0
		for _, r := range home.Requests() {
			if strings.HasSuffix(r.Path, "/view") {
				n++
			}
		}
		return n
	}
	build := func(value func(i int) string, n int) map[string]any {
		p := map[string]any{"0": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "p"}}}
		for i := 1; i <= n; i++ {
			p[fmt.Sprint(i)] = map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": value(i)}}
		}
		return p
	}

	views := homeViews()
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": build(func(i int) string { return fmt.Sprintf("k%d/../pic.png", i) }, 2000)})
	nodeErrorOn(t, "2000 spellings with ..", st, body, "1")
	if len(gpu.Uploads()) != 0 || homeViews() != views {
		t.Fatalf("refused prompt fetched %d files and uploaded %d", homeViews()-views, len(gpu.Uploads()))
	}

	spellings := []string{"pic.png", "pic.png [input]", " pic.png", "pic.png "}
	a := g.queue("alice", b.SID, build(func(i int) string { return spellings[i%len(spellings)] }, 2000))
	if frames := b.untilJobEnd(a.PromptID, 60*time.Second); indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job did not succeed: %v", types(frames))
	}
	if n := len(gpu.Uploads()); n != 1 {
		t.Fatalf("one file named 2000 times: %d uploads", n)
	}

	views = homeViews()
	st, body, _ = g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": build(func(i int) string { return fmt.Sprintf("f%d.png", i) }, 300)})
	var pe struct {
		Error struct{ Message, Details string } `json:"error"`
	}
	if st != 400 || json.Unmarshal(body, &pe) != nil || !strings.Contains(pe.Error.Details, "256") {
		t.Fatalf("300 different files: %d %.300s", st, body)
	}
	if homeViews() != views || len(gpu.Uploads()) != 1 {
		t.Fatalf("a refused prompt fetched files")
	}
}

// openFiles counts this process's open file descriptors.
func openFiles(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// Issue 8, finding 4: a prompt's inputs are fetched and uploaded a few at
// a time, never all opened at once: 200 different files on home raise the
// process's open files by far less than 200.
func TestInputsForwardedFewAtATime(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	const n = 200
	p := map[string]any{"0": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "p"}}}
	for i := 1; i <= n; i++ {
		name := fmt.Sprintf("f%d.png", i)
		home.PutInput("", name, pngBytes(t, 4, 4, color.NRGBA{uint8(i), 2, 3, 255}))
		p[fmt.Sprint(i)] = map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": name}}
	}
	b := g.openBrowser("alice", "tab", true)
	base := openFiles(t)
	var peak atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if d := int64(openFiles(t) - base); d > peak.Load() {
				peak.Store(d)
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	a := g.queue("alice", b.SID, p)
	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	close(stop)
	wg.Wait()
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job did not succeed: %v", types(frames))
	}
	if got := len(gpu.Uploads()); got != n {
		t.Fatalf("%d uploads, want %d", got, n)
	}
	t.Logf("open files rose by at most %d while forwarding %d inputs", peak.Load(), n)
	if peak.Load() >= 100 {
		t.Fatalf("open files rose by %d while forwarding %d inputs", peak.Load(), n)
	}
}

// Issue 8, finding 4: an input the user's home cannot deliver is the user's
// error, reported at once on the node (ComfyUI's 400), never a cold start:
// the GPU's circuit stays closed and the next user's job runs at once.
func TestInputFailureIsTheUsersNotTheGPUs(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadHome := "http://" + l.Addr().String()
	l.Close() // nothing listens there: bob's home is unreachable
	cf := poolCaddyfile(home.URL(), gpu.URL(), "")
	cf = strings.Replace(cf, "\tcomfyume {\n\t\thome "+home.URL(), "\tmap {http.request.header.X-User} {comfy_home} {\n\t\tbob "+deadHome+"\n\t\tdefault "+home.URL()+"\n\t}\n\tcomfyume {\n\t\thome {comfy_home}", 1)
	if !strings.Contains(cf, "{comfy_home}") {
		t.Fatalf("Caddyfile not rewritten:\n%s", cf)
	}
	g := startCaddy(t, cf)
	cat := map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "cat.png"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "x"}},
	}
	for i := 0; i < 5; i++ {
		st, body, _ := g.do("bob", "POST", "/api/prompt", map[string]any{"prompt": cat})
		details := nodeErrorOn(t, "input from an unreachable home", st, body, "1")
		if strings.Contains(details, deadHome) || strings.Contains(details, l.Addr().String()) {
			t.Errorf("error shows an internal address: %s", details)
		}
	}
	alice := g.openBrowser("alice", "tab", true)
	start := time.Now()
	a := g.queue("alice", alice.SID, samplerWorkflow("next", 2))
	frames := alice.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 || notices(frames, "Waiting for a GPU") > 0 {
		t.Fatalf("the next user's job: %v", types(frames))
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("the next user's job took %v: the GPU was blamed for bob's input", d)
	}
}

// Issue 8, finding 6: once history_limit forgets alice's job, its files
// are gone, and a prompt_id reused by bob starts with an empty folder —
// even if files were left behind under that id.
func TestForgottenIDCannotReachOldFiles(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	dir := t.TempDir()
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}", "outputs disk "+dir+"\n\t\thistory_limit 1", 1)
	g := startCaddy(t, cf)
	alice := g.openBrowser("alice", "tab-a", true)
	bob := g.openBrowser("bob", "tab-b", true)
	id := uuid.NewString()
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("old", 2), "client_id": alice.SID, "prompt_id": id})
	if st != 200 {
		t.Fatalf("alice's prompt: %d %s", st, body)
	}
	ref := outputRef(t, alice.untilJobEnd(id, 30*time.Second), "3")
	st, secret, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 {
		t.Fatalf("alice's output: %d", st)
	}
	next := g.queue("alice", alice.SID, samplerWorkflow("new", 2))
	alice.untilJobEnd(next.PromptID, 30*time.Second)
	folder := filepath.Join(dir, id)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, _, _ := g.do("alice", "GET", "/api/jobs/"+id, nil)
		_, err := os.Stat(folder)
		if st == 404 && os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("forgotten job: detail %d, its files: %v", st, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Files left behind under the id (a removal that failed, files from
	// before an upgrade) must not become bob's either.
	leftover := filepath.Join(folder, "output", fmt.Sprint(ref["filename"]))
	if err := os.MkdirAll(filepath.Dir(leftover), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(leftover, secret, 0o640); err != nil {
		t.Fatal(err)
	}
	st, body, _ = g.do("bob", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("claim", 50), "client_id": bob.SID, "prompt_id": id})
	if st == 200 {
		st, got, _ := g.do("bob", "GET", "/api/view?"+viewQuery(ref), nil)
		if st != 404 || bytes.Equal(got, secret) {
			t.Fatalf("bob reached alice's forgotten output through her old id: %d (%d bytes)", st, len(got))
		}
	} else if st != 400 {
		t.Fatalf("bob's prompt with a forgotten id: %d %s", st, body)
	}
}
