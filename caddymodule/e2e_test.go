package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

var uuidV4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// samplerWorkflow: EmptyImage → FakeSampler (progress + previews) → SaveImage.
func samplerWorkflow(prefix string, steps int) map[string]any {
	return map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 48, "batch_size": 1, "color": 0x8e6eed}},
		"2": map[string]any{"class_type": "FakeSampler", "inputs": map[string]any{"image": []any{"1", 0}, "steps": steps}},
		"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": prefix}},
	}
}

type promptAnswer struct {
	PromptID   string          `json:"prompt_id"`
	Number     float64         `json:"number"`
	NodeErrors json.RawMessage `json:"node_errors"`
}

func (g *gateway) queue(user, clientID string, prompt map[string]any) promptAnswer {
	g.t.Helper()
	st, b, _ := g.do(user, "POST", "/api/prompt", map[string]any{"prompt": prompt, "client_id": clientID})
	if st != 200 {
		g.t.Fatalf("POST /api/prompt: %d %s", st, b)
	}
	var a promptAnswer
	if err := json.Unmarshal(b, &a); err != nil || a.PromptID == "" || a.NodeErrors == nil {
		g.t.Fatalf("POST /api/prompt answer %s (%v)", b, err)
	}
	return a
}

func outputRef(t testing.TB, frames []wsFrame, node string) map[string]any {
	t.Helper()
	for _, f := range frames {
		if f.Type == "executed" && f.str("node") == node {
			out, _ := f.Data["output"].(map[string]any)
			imgs, _ := out["images"].([]any)
			if len(imgs) > 0 {
				return imgs[0].(map[string]any)
			}
		}
	}
	t.Fatalf("no executed output for node %s in %v", node, types(frames))
	return nil
}

func viewQuery(ref map[string]any) string {
	q := url.Values{}
	for _, k := range []string{"filename", "subfolder", "type"} {
		q.Set(k, fmt.Sprint(ref[k]))
	}
	return q.Encode()
}

func indexOf(frames []wsFrame, typ string) int {
	for i, f := range frames {
		if f.Type == typ {
			return i
		}
	}
	return -1
}

// One prompt from the unchanged UI runs on the GPU pool; the browser sees
// the whole job under the prompt_id the gateway answered, with type-4
// previews, and the output bytes are the GPU's, served by the gateway even
// after the GPU server is gone.
func TestPromptRunsOnPoolEndToEnd(t *testing.T) {
	for _, version := range []string{"2024-12", "2026"} {
		t.Run("gpu-"+version, func(t *testing.T) {
			t.Setenv("COMFYUME_TEST_TOKEN", "s3cret")
			home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
			gpu := comfytest.Start(t, comfytest.Options{Version: version, Name: "gpu"})
			g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
			b := g.openBrowser("alice", "", true)

			a := g.queue("alice", b.SID, samplerWorkflow("e2e", 3))
			if !uuidV4.MatchString(a.PromptID) {
				t.Fatalf("prompt_id %q is not a lowercase UUIDv4", a.PromptID)
			}
			frames := b.untilJobEnd(a.PromptID, 30*time.Second)
			seq := types(frames)
			t.Logf("browser saw: %v", seq)

			// Every job event carries the gateway's prompt_id.
			for _, f := range frames {
				if f.text && f.Type != "status" && f.str("prompt_id") != a.PromptID {
					t.Fatalf("%s frame carries prompt_id %q, want %q", f.Type, f.str("prompt_id"), a.PromptID)
				}
			}
			start, executed, success := indexOf(frames, "execution_start"), indexOf(frames, "executed"), indexOf(frames, "execution_success")
			if start < 0 || executed < start || success < executed || success >= len(frames)-1 {
				t.Fatalf("events out of order: %v", seq)
			}
			if indexOf(frames, "progress") < 0 || indexOf(frames, "executing") < 0 {
				t.Fatalf("no progress/executing events: %v", seq)
			}
			// Previews reach a metadata-capable browser as type 4 naming the
			// job and node, even from a GPU server that only sends type 1.
			previews := 0
			for _, f := range frames {
				if !f.text {
					if f.binary != 4 {
						t.Fatalf("preview of type %d, want 4", f.binary)
					}
					n := int(uint32(f.data[4])<<24 | uint32(f.data[5])<<16 | uint32(f.data[6])<<8 | uint32(f.data[7]))
					var md map[string]any
					if err := json.Unmarshal(f.data[8:8+n], &md); err != nil {
						t.Fatal(err)
					}
					if md["prompt_id"] != a.PromptID || md["node_id"] != "2" {
						t.Fatalf("preview metadata %v", md)
					}
					if !bytes.HasPrefix(f.data[8+n:], []byte{0xff, 0xd8}) && !bytes.HasPrefix(f.data[8+n:], []byte("\x89PNG")) {
						t.Fatalf("preview payload is not an image")
					}
					previews++
				}
			}
			if previews == 0 {
				t.Fatalf("no previews in %v", seq)
			}

			// It ran on the GPU, not on home.
			if n := len(gpu.Prompts()); n != 1 {
				t.Fatalf("gpu got %d prompts", n)
			}
			if n := len(home.Prompts()); n != 0 {
				t.Fatalf("home got %d prompts", n)
			}
			sent := gpu.Prompts()[0]
			if got := sent.Header.Get("Authorization"); got != "Bearer s3cret" {
				t.Fatalf("Authorization toward GPU = %q", got)
			}
			if version == "2026" && sent.PromptID != a.PromptID {
				t.Fatalf("gpu ran prompt_id %q, want %q", sent.PromptID, a.PromptID)
			}

			ref := outputRef(t, frames, "3")
			if ref["subfolder"] != "comfyume/"+a.PromptID || ref["type"] != "output" {
				t.Fatalf("output ref not rewritten to the gateway's copy: %v", ref)
			}
			want, ok := gpu.OutputFile("output", "", ref["filename"].(string))
			if !ok {
				t.Fatalf("gpu has no output %v", ref["filename"])
			}
			st, got, hdr := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
			if st != 200 || !bytes.Equal(got, want) {
				t.Fatalf("/api/view: %d, %d bytes (want %d)", st, len(got), len(want))
			}
			if ct := hdr.Get("Content-Type"); ct != "image/png" {
				t.Fatalf("Content-Type %q", ct)
			}
			if _, err := png.Decode(bytes.NewReader(got)); err != nil {
				t.Fatalf("output is not a PNG: %v", err)
			}
			st, part, _ := g.do("alice", "GET", "/view?"+viewQuery(ref), nil, "Range", "bytes=0-9")
			if st != 206 || !bytes.Equal(part, want[:10]) {
				t.Fatalf("Range: %d %q", st, part)
			}

			// The frontend's preview parameter (sent with a raw ";").
			st, jp, hdr := g.do("alice", "GET", "/api/view?"+viewQuery(ref)+"&preview=jpeg;80", nil)
			if _, err := jpeg.Decode(bytes.NewReader(jp)); st != 200 || hdr.Get("Content-Type") != "image/jpeg" || err != nil {
				t.Fatalf("preview=jpeg;80: %d %s %v", st, hdr.Get("Content-Type"), err)
			}
			st, wp, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref)+"&preview=webp;90&channel=rgba", nil)
			if st != 200 || !bytes.Equal(wp, want) {
				t.Fatalf("preview=webp;90 (no WebP encoder: the original): %d", st)
			}
			st, rgb, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref)+"&channel=rgb", nil)
			if img, err := png.Decode(bytes.NewReader(rgb)); st != 200 || err != nil || img.Bounds().Dx() != 64 {
				t.Fatalf("channel=rgb: %d %v", st, err)
			}

			// The GPU container vanishes; finished outputs still load.
			gpu.Kill()
			st, got, _ = g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
			if st != 200 || !bytes.Equal(got, want) {
				t.Fatalf("/api/view after GPU death: %d", st)
			}
		})
	}
}

func TestRejectedPromptReachesBrowserUnchanged(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	bad := map[string]any{"1": map[string]any{"class_type": "NoSuchNode", "inputs": map[string]any{}}}
	st, body, _ := g.do("alice", "POST", "/prompt", map[string]any{"prompt": bad})
	if st != 400 {
		t.Fatalf("status %d %s", st, body)
	}
	var e struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
		NodeErrors any `json:"node_errors"`
	}
	// Answered from the pool's cached /object_info (missing_node_type, as
	// newer ComfyUI does) before anything is sent.
	if err := json.Unmarshal(body, &e); err != nil || e.Error.Type != "missing_node_type" || !strings.Contains(e.Error.Message, "NoSuchNode") {
		t.Fatalf("body %s", body)
	}
	// A missing input file: node_errors name the node, as ComfyUI does.
	missing := map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "missing.png"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "x"}},
	}
	st, body, _ = g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": missing})
	var ne struct {
		NodeErrors map[string]any `json:"node_errors"`
	}
	if st != 400 || json.Unmarshal(body, &ne) != nil || ne.NodeErrors["1"] == nil {
		t.Fatalf("missing input: %d %s", st, body)
	}
	// A model the pool does not have: value_not_in_list on that node, at
	// once — even while the pool is down (its install is cached).
	model := map[string]any{
		"1": map[string]any{"class_type": "FakeCheckpointImage", "inputs": map[string]any{"ckpt_name": "missing_model.safetensors"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "m"}},
	}
	gpu.Kill()
	st, body, _ = g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": model})
	var ve struct {
		NodeErrors map[string]struct {
			Errors []struct {
				Type string `json:"type"`
			} `json:"errors"`
			ClassType string `json:"class_type"`
		} `json:"node_errors"`
	}
	if st != 400 || json.Unmarshal(body, &ve) != nil || len(ve.NodeErrors["1"].Errors) != 1 || ve.NodeErrors["1"].Errors[0].Type != "value_not_in_list" {
		t.Fatalf("missing model: %d %s", st, body)
	}
	if n := len(gpu.Prompts()); n != 0 {
		t.Fatalf("%d prompts reached the GPU", n)
	}
	// Nothing is listed for rejected prompts.
	var jobs struct {
		Jobs []map[string]any `json:"jobs"`
	}
	g.getJSON("alice", "/api/jobs", &jobs)
	if len(jobs.Jobs) != 0 {
		t.Fatalf("rejected prompts listed: %v", jobs.Jobs)
	}
}

// A pool nobody answers for: the prompt is accepted and held (a serverless
// cold start looks the same), the browser is told why it waits, and after
// cold_start_timeout the job ends with an error the UI shows.
func TestUnreachablePoolFailsAfterColdStartTimeout(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	dead := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cf := strings.Replace(poolCaddyfile(home.URL(), dead, ""), "pool gpu {", "pool gpu {\n\t\t\tcold_start_timeout 1s", 1)
	unreachablePoolFails(t, startCaddy(t, cf))
}

// The same with the queue in Valkey (shared by replicas).
func TestUnreachablePoolFailsWithSharedQueue(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	dead := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), dead, "")
	cf = strings.Replace(cf, "pool gpu {", "pool gpu {\n\t\t\tcold_start_timeout 1s", 1)
	unreachablePoolFails(t, startCaddy(t, cf))
}

func unreachablePoolFails(t *testing.T, g *gateway) {
	t.Helper()
	b := g.openBrowser("alice", "", true)
	bob := g.openBrowser("bob", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("x", 1))
	// Bob's jobs wait in the queue behind alice's (max_jobs 1) and behind
	// the endpoint's open circuit: they too end when the timeout passes.
	var bobs []string
	queued := time.Now()
	for i := 0; i < 2; i++ {
		bobs = append(bobs, g.queue("bob", bob.SID, samplerWorkflow(fmt.Sprint("y", i), 1)).PromptID)
	}
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	n := notices(frames, "Waiting for a GPU")
	i := indexOf(frames, "execution_error")
	if n == 0 || i < 0 || !strings.Contains(frames[i].str("exception_message"), "gpu") {
		t.Fatalf("held job: %d notices, frames %v", n, types(frames))
	}
	var j map[string]any
	g.getJSON("alice", "/api/jobs/"+a.PromptID, &j)
	if j["status"] != "failed" {
		t.Fatalf("job %v", j["status"])
	}
	// Either may end first.
	failed := map[string]bool{}
	deadline := time.Now().Add(30 * time.Second)
	for len(failed) < len(bobs) {
		f := bob.next(time.Until(deadline))
		if f.Type == "execution_error" && strings.Contains(f.str("exception_message"), "gpu") {
			failed[f.str("prompt_id")] = true
		}
	}
	for _, id := range bobs {
		if !failed[id] {
			t.Fatalf("bob's queued job %s did not fail: %v", id, failed)
		}
	}
	// The timeout holds for them too (1 s, with ample slack for a busy
	// machine; without it they wait for turns at trial sends: 8 s or more).
	if waited := time.Since(queued); waited > 6*time.Second {
		t.Fatalf("bob's queued jobs failed after %s; cold_start_timeout is 1s", waited.Round(time.Millisecond))
	}
}

func pngBytes(t testing.TB, w, h int, c color.NRGBA) []byte {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.SetNRGBA(x, y, c)
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// Files a prompt references on home (plain names, subfolder annotations)
// and outputs captured earlier are uploaded to the GPU before the prompt.
func TestInputsForwardedToPool(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	cat := pngBytes(t, 16, 16, color.NRGBA{200, 10, 10, 255})
	mask := pngBytes(t, 16, 16, color.NRGBA{0, 0, 0, 128})
	home.PutInput("", "cat.png", cat)
	home.PutInput("clipspace", "mask-1.png", mask)
	b := g.openBrowser("alice", "", true)
	prompt := map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "cat.png"}},
		"2": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"1", 0}}},
		"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": "inv"}},
		"4": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "clipspace/mask-1.png [input]"}},
		"5": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"4", 0}, "filename_prefix": "mask"}},
	}
	a := g.queue("alice", b.SID, prompt)
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job did not succeed: %v", types(frames))
	}
	uploaded := map[string][]byte{}
	for _, u := range gpu.Uploads() {
		uploaded[u.Subfolder+"/"+u.Name] = u.Data
	}
	// Each job's inputs live in their own folder on the shared GPU.
	dir := "comfyume/" + a.PromptID
	if !bytes.Equal(uploaded[dir+"/cat.png"], cat) || !bytes.Equal(uploaded[dir+"/clipspace/mask-1.png"], mask) {
		t.Fatalf("uploads to GPU: %v", keys(uploaded))
	}

	// Load a captured output as the next prompt's input.
	ref := outputRef(t, frames, "3")
	_, captured, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	again := map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": ref["subfolder"].(string) + "/" + ref["filename"].(string) + " [output]"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "again"}},
	}
	a2 := g.queue("alice", b.SID, again)
	frames = b.untilJobEnd(a2.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("output-as-input job did not succeed: %v", frames[len(frames)-2].data)
	}
	found := false
	for _, u := range gpu.Uploads() {
		if u.Name == ref["filename"] && bytes.Equal(u.Data, captured) {
			found = true
		}
	}
	if !found {
		t.Fatalf("captured output was not forwarded")
	}
	// Another user cannot use alice's output as an input: the gateway
	// answers as ComfyUI does for a file that is not there.
	bob := g.openBrowser("bob", "", true)
	st, body, _ := g.do("bob", "POST", "/api/prompt", map[string]any{"prompt": again, "client_id": bob.SID})
	var ne struct {
		NodeErrors map[string]any `json:"node_errors"`
	}
	if st != 400 || json.Unmarshal(body, &ne) != nil || ne.NodeErrors["1"] == nil {
		t.Fatalf("bob using alice's output: %d %s", st, body)
	}
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
