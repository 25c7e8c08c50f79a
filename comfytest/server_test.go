package comfytest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

func simpleWorkflow(prefix string, col int) map[string]any {
	return map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 16, "height": 16, "batch_size": 1, "color": col}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": prefix}},
	}
}

func TestQueueNumbersDeleteClear(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	base := srv.URL()
	ws := dialWS(t, base, "q")
	ws.next()
	srv.FailNext("hang")
	running := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("a", 1), "client_id": "q"})
	ws.until(func(f frame) bool { return f.typ == "executing" && f.str("node") == "1" })

	var ids []string
	var numbers []any
	for i, body := range []map[string]any{
		{"prompt": simpleWorkflow("b", 2), "client_id": "q"},
		{"prompt": simpleWorkflow("c", 3), "client_id": "q", "front": true},
		{"prompt": simpleWorkflow("d", 4), "client_id": "q", "number": 7},
	} {
		code, b := postJSON(t, base+"/api/prompt", body)
		var r map[string]any
		if code != 200 || json.Unmarshal(b, &r) != nil {
			t.Fatalf("prompt %d: %d %s", i, code, b)
		}
		ids = append(ids, r["prompt_id"].(string))
		numbers = append(numbers, r["number"])
		if i == 2 && !strings.Contains(string(b), `"number":7.0`) {
			t.Fatalf("explicit number is a float: %s", b)
		}
	}
	if !reflect.DeepEqual(numbers, []any{1.0, -2.0, 7.0}) {
		t.Fatalf("numbers %v", numbers)
	}
	var q struct {
		Running [][]any `json:"queue_running"`
		Pending [][]any `json:"queue_pending"`
	}
	getJSON(t, base+"/queue", &q)
	if len(q.Running) != 1 || q.Running[0][1] != running || len(q.Running[0]) != 5 || len(q.Pending) != 3 {
		t.Fatalf("queue %+v", q)
	}
	for _, it := range q.Pending {
		if len(it) != 5 || it[3].(map[string]any)["client_id"] != "q" {
			t.Fatalf("pending item %v", it)
		}
	}
	var pr map[string]map[string]any
	getJSON(t, base+"/prompt", &pr)
	if pr["exec_info"]["queue_remaining"] != 4.0 {
		t.Fatalf("GET /prompt %v", pr)
	}
	if code, _ := postJSON(t, base+"/queue", map[string]any{"delete": []any{ids[0], "unknown"}}); code != 200 {
		t.Fatalf("delete %d", code)
	}
	getJSON(t, base+"/queue", &q)
	if len(q.Pending) != 2 {
		t.Fatalf("after delete %+v", q.Pending)
	}
	postJSON(t, base+"/queue", map[string]any{"clear": true})
	getJSON(t, base+"/queue", &q)
	if len(q.Pending) != 0 || len(q.Running) != 1 {
		t.Fatalf("after clear %+v", q)
	}
	// 2024-12 ignores the prompt_id of /interrupt and stops whatever runs.
	postJSON(t, base+"/interrupt", map[string]any{"prompt_id": "someone-else"})
	ws.untilDone(running)
	getJSON(t, base+"/queue", &q)
	if len(q.Running) != 0 {
		t.Fatalf("still running %+v", q)
	}
	// Malformed bodies are aiohttp 500s.
	if code, _ := postJSON(t, base+"/queue", "nope"); code != 500 {
		t.Fatalf("bad /queue body: %d", code)
	}
	if code, _ := postJSON(t, base+"/free", map[string]any{"unload_models": true}); code != 200 {
		t.Fatalf("/free %d", code)
	}
	postJSON(t, base+"/history", map[string]any{"delete": []any{running}})
	var h map[string]any
	getJSON(t, base+"/history", &h)
	if len(h) != 0 {
		t.Fatalf("history after delete: %v", keys(h))
	}
}

func TestFrontRunsFirstAndHistoryPaging(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	base := srv.URL()
	srv.FailNext("hang")
	blocker := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("x", 0)})
	waitFor(t, "blocker running", func() bool {
		var q map[string][]any
		getJSON(t, base+"/queue", &q)
		return len(q["queue_running"]) == 1
	})
	late := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("late", 1)})
	front := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("front", 2), "front": true})
	postJSON(t, base+"/interrupt", nil)
	waitFor(t, "queue drained", func() bool {
		var h map[string]any
		getJSON(t, base+"/history", &h)
		return len(h) == 3
	})
	_, b := doReq(t, "GET", base+"/history", nil, nil)
	// Completion order: blocker, front (number -2), late (number 1).
	if i, j, k := strings.Index(string(b), blocker), strings.Index(string(b), front), strings.Index(string(b), late); !(i < j && j < k) {
		t.Fatalf("history order wrong: %d %d %d", i, j, k)
	}
	h := map[string]any{}
	getJSON(t, base+"/history?max_items=2", &h)
	if len(h) != 2 || h[front] == nil || h[late] == nil {
		t.Fatalf("max_items=2: %v", keys(h))
	}
	h = map[string]any{}
	getJSON(t, base+"/history?max_items=1&offset=0", &h)
	if len(h) != 1 || h[blocker] == nil {
		t.Fatalf("offset=0: %v", keys(h))
	}
	var one map[string]any
	getJSON(t, base+"/history/unknown", &one)
	if len(one) != 0 {
		t.Fatalf("unknown history %v", one)
	}
	postJSON(t, base+"/history", map[string]any{"clear": true})
	h = map[string]any{}
	getJSON(t, base+"/history", &h)
	if len(h) != 0 {
		t.Fatal("history not cleared")
	}
}

func TestReconnectResendsExecutingAndReplacesSocket(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	base := srv.URL()
	ws1 := dialWS(t, base, "tab-1")
	ws1.next()
	srv.FailNext("hang")
	id := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("r", 5), "client_id": "tab-1"})
	ws1.until(func(f frame) bool { return f.typ == "executing" && f.str("node") == "1" })

	ws2 := dialWS(t, base, "tab-1")
	st := ws2.next()
	if st.typ != "status" || st.str("sid") != "tab-1" {
		t.Fatalf("first %s", st.raw)
	}
	ex := ws2.next()
	if string(ex.raw) != `{"type":"executing","data":{"node":"1"}}` {
		t.Fatalf("re-sent executing %s", ex.raw)
	}
	// The old socket is closed, not orphaning the new one.
	_ = ws1.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		if _, _, err := ws1.c.ReadMessage(); err != nil {
			break
		}
	}
	postJSON(t, base+"/interrupt", nil)
	fs := ws2.untilDone(id)
	if !contains(types(fs), "execution_interrupted") {
		t.Fatalf("new socket did not get the end of the job: %v", types(fs))
	}
	// Another sid does not get the re-send.
	ws3 := dialWS(t, base, "tab-3")
	ws3.next()
}

func TestKill(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	base := srv.URL()
	ws := dialWS(t, base, "k")
	ws.next()
	srv.FailNext("hang")
	queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("k", 5), "client_id": "k"})
	ws.until(func(f frame) bool { return f.typ == "executing" })
	srv.Kill()
	_ = ws.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		if _, _, err := ws.c.ReadMessage(); err != nil {
			if websocket.IsCloseError(err, websocket.CloseGoingAway) {
				t.Fatal("Kill must not say goodbye")
			}
			break
		}
	}
	client := &http.Client{Timeout: 2 * time.Second}
	if _, err := client.Get(base + "/system_stats"); err == nil {
		t.Fatal("request after Kill succeeded")
	}
	if len(srv.Prompts()) != 1 {
		t.Fatal("introspection after Kill")
	}
	srv.Close() // idempotent
}

// DropSockets cuts sockets without a goodbye and refuses new ones for a
// while; the server itself runs on: the job finishes and HTTP answers.
func TestDropSockets(t *testing.T) {
	srv := Start(t, Options{StepDelay: 5 * time.Millisecond})
	base := srv.URL()
	ws := dialWS(t, base, "d")
	ws.next()
	id := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("d", 20), "client_id": "d"})
	ws.until(func(f frame) bool { return f.typ == "executing" })
	srv.DropSockets(300 * time.Millisecond)
	_ = ws.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		if _, _, err := ws.c.ReadMessage(); err != nil {
			if websocket.IsCloseError(err, websocket.CloseGoingAway) {
				t.Fatal("DropSockets must not say goodbye")
			}
			break
		}
	}
	if _, resp, err := websocket.DefaultDialer.Dial(wsURL(base)+"?clientId=d", nil); err == nil || resp == nil || resp.StatusCode != 503 {
		t.Fatalf("socket during the outage: %v %v", err, resp)
	}
	// The job ends meanwhile; its history says so over HTTP.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var h map[string]any
		getJSON(t, base+"/history/"+id, &h)
		if len(h) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the job did not end during the outage")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	again := dialWS(t, base, "d")
	if f := again.next(); f.typ != "status" {
		t.Fatalf("after the outage: %s", f.typ)
	}
}

func TestHandlerUnderHTTPTest(t *testing.T) {
	s := New(Options{Version: "2026", StepDelay: time.Millisecond})
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	defer s.Close()
	ws := dialWS(t, ts.URL, "h")
	ws.next()
	id := queuePrompt(t, ts.URL, map[string]any{"prompt": simpleWorkflow("h", 9), "client_id": "h"})
	ws.untilDone(id)
	if s.URL() != "" {
		t.Fatalf("URL without Listen: %q", s.URL())
	}
}

func TestCacheAndCounters(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	base := srv.URL()
	ws := dialWS(t, base, "c")
	ws.next()
	run := func(wf map[string]any) (cached []any, files []string) {
		id := queuePrompt(t, base, map[string]any{"prompt": wf, "client_id": "c"})
		for _, f := range ws.untilDone(id) {
			if f.typ == "execution_cached" {
				cached = f.data["nodes"].([]any)
			}
			if f.typ == "executed" {
				for _, im := range f.data["output"].(map[string]any)["images"].([]any) {
					files = append(files, im.(map[string]any)["filename"].(string))
				}
			}
		}
		return
	}
	a, b := simpleWorkflow("same", 1), simpleWorkflow("same", 2)
	if c, f := run(a); len(c) != 0 || f[0] != "same_00001_.png" {
		t.Fatalf("run A: %v %v", c, f)
	}
	if c, f := run(a); len(c) != 2 || f[0] != "same_00001_.png" {
		t.Fatalf("A again should be cached: %v %v", c, f)
	}
	if c, f := run(b); len(c) != 0 || f[0] != "same_00002_.png" {
		t.Fatalf("run B: %v %v", c, f)
	}
	// B evicted A's cache entries (ComfyUI keeps only the last prompt's).
	if c, f := run(a); len(c) != 0 || f[0] != "same_00003_.png" {
		t.Fatalf("A after B: %v %v", c, f)
	}
	// Prefix with a subfolder and %width%.
	wf := simpleWorkflow("sub/dir/img_%width%", 3)
	if _, f := run(wf); f[0] != "img_16_00001_.png" {
		t.Fatalf("subfolder save: %v", f)
	}
	if _, ok := srv.OutputFile("output", "sub/dir", "img_16_00001_.png"); !ok {
		t.Fatal("subfolder output missing")
	}
	// Escaping the output dir is a runtime error.
	id := queuePrompt(t, base, map[string]any{"prompt": simpleWorkflow("../evil", 4), "client_id": "c"})
	fs := ws.untilDone(id)
	if !contains(types(fs), "execution_error") {
		t.Fatalf("escape: %v", types(fs))
	}
}

func TestValidationErrors(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	base := srv.URL()
	post := func(prompt map[string]any) (int, map[string]any) {
		code, b := postJSON(t, base+"/prompt", map[string]any{"prompt": prompt})
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("%s", b)
		}
		return code, m
	}
	code, m := post(map[string]any{"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{}}})
	if code != 400 || m["error"].(map[string]any)["type"] != "prompt_no_outputs" || !reflect.DeepEqual(m["node_errors"], []any{}) {
		t.Fatalf("no outputs: %d %v", code, m)
	}
	code, m = post(map[string]any{"1": map[string]any{"inputs": map[string]any{}}})
	if code != 400 || m["error"].(map[string]any)["message"] != "Cannot execute because a node is missing the class_type property." {
		t.Fatalf("no class_type: %v", m)
	}
	code, m = post(map[string]any{"5": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"filename_prefix": "x"}}})
	want := `{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "Required input is missing: images", "extra_info": {}}, "node_errors": {"5": {"errors": [{"type": "required_input_missing", "message": "Required input is missing", "details": "images", "extra_info": {"input_name": "images"}}], "dependent_outputs": ["5"], "class_type": "SaveImage"}}}`
	if code != 400 || !jsonEqual(t, mustJSON(m), []byte(want)) {
		t.Fatalf("missing input: %s", mustJSON(m))
	}
	// One good output, one bad: 200 with node_errors.
	wf := simpleWorkflow("ok", 1)
	wf["3"] = map[string]any{"class_type": "ImageBlur", "inputs": map[string]any{"image": []any{"1", 0}, "blur_radius": 99, "sigma": "abc"}}
	wf["4"] = map[string]any{"class_type": "PreviewImage", "inputs": map[string]any{"images": []any{"3", 0}}}
	code, m = post(wf)
	if code != 200 {
		t.Fatalf("partial: %d %v", code, m)
	}
	ne := m["node_errors"].(map[string]any)["3"].(map[string]any)
	errs := ne["errors"].([]any)
	if len(errs) != 2 || !reflect.DeepEqual(ne["dependent_outputs"], []any{"4"}) {
		t.Fatalf("node errors %v", ne)
	}
	if e := errs[0].(map[string]any); e["type"] != "value_bigger_than_max" || e["message"] != "Value 99 bigger than max of 31" {
		t.Fatalf("max error %v", e)
	}
	if e := errs[1].(map[string]any); e["type"] != "invalid_input_type" || e["details"] != "sigma, abc, could not convert string to float: 'abc'" {
		t.Fatalf("type error %v", e)
	}
	// Link to a missing node, bad link shape, type mismatch.
	code, m = post(map[string]any{"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"99", 0}, "filename_prefix": "x"}}})
	if e := m["node_errors"].(map[string]any)["2"].(map[string]any)["errors"].([]any)[0].(map[string]any); code != 400 || e["type"] != "exception_during_validation" || e["details"] != "'99'" {
		t.Fatalf("missing link target %v", m)
	}
	code, m = post(map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "x.png"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 1}, "filename_prefix": "x"}},
	})
	if e := m["node_errors"].(map[string]any)["2"].(map[string]any)["errors"].([]any)[0].(map[string]any); code != 400 || e["type"] != "return_type_mismatch" || e["details"] != "images, received_type(MASK) mismatch input_type(IMAGE)" {
		t.Fatalf("mismatch %v", m)
	}
	code, m = post(map[string]any{"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1"}, "filename_prefix": "x"}}})
	if e := m["node_errors"].(map[string]any)["2"].(map[string]any)["errors"].([]any)[0].(map[string]any); code != 400 || e["type"] != "bad_linked_input" {
		t.Fatalf("bad link %v", m)
	}
	// A cycle is rejected, not a stack overflow.
	code, _ = post(map[string]any{
		"1": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"2", 0}}},
		"2": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"1", 0}}},
		"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": "x"}},
	})
	if code != 400 {
		t.Fatalf("cycle: %d", code)
	}
	if n := len(srv.Prompts()); n != 1 {
		t.Fatalf("%d prompts recorded, want only the accepted one", n)
	}
}

func TestLoadImageVariants(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	base := srv.URL()
	srv.PutInput("sub", "in.png", pngBytes(t, 4, 4, color.NRGBA{10, 20, 30, 255}))
	ws := dialWS(t, base, "l")
	ws.next()
	first := queuePrompt(t, base, map[string]any{"client_id": "l", "prompt": simpleWorkflow("made", 0x0a141e)})
	ws.untilDone(first)
	for _, ref := range []string{"sub/in.png", "sub/in.png [input]", "made_00001_.png [output]"} {
		wf := map[string]any{
			"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": ref}},
			"2": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"1", 0}}},
			"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": "inv"}},
		}
		id := queuePrompt(t, base, map[string]any{"prompt": wf, "client_id": "l"})
		var name string
		for _, f := range ws.untilDone(id) {
			if f.typ == "executed" {
				name = f.data["output"].(map[string]any)["images"].([]any)[0].(map[string]any)["filename"].(string)
			}
		}
		data, _ := srv.OutputFile("output", "", name)
		img, err := png.Decode(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		if c := color.NRGBAModel.Convert(img.At(1, 1)).(color.NRGBA); c != (color.NRGBA{245, 235, 225, 255}) {
			t.Fatalf("%s: inverted pixel %v", ref, c)
		}
	}
	// The COMBO lists only top-level input files.
	srv.PutInput("", "top.png", pngBytes(t, 1, 1, color.NRGBA{}))
	var oi map[string]map[string]any
	getJSON(t, base+"/object_info/LoadImage", &oi)
	req := oi["LoadImage"]["input"].(map[string]any)["required"].(map[string]any)["image"].([]any)
	if !reflect.DeepEqual(req[0], []any{"top.png"}) || req[1].(map[string]any)["image_upload"] != true {
		t.Fatalf("LoadImage input %v", req)
	}
	var all map[string]map[string]any
	getJSON(t, base+"/api/object_info", &all)
	for _, n := range []string{"EmptyImage", "LoadImage", "ImageInvert", "ImageBlur", "SaveImage", "PreviewImage", "SaveImageWebsocket", "FakeSampler"} {
		if all[n] == nil || all[n]["name"] != n {
			t.Fatalf("object_info lacks %s", n)
		}
	}
	if all["SaveImage"]["output_node"] != true || all["ImageBlur"]["python_module"] != "comfy_extras.nodes_post_processing" {
		t.Fatalf("object_info details %v", all["SaveImage"])
	}
	var none map[string]any
	getJSON(t, base+"/object_info/Nope", &none)
	if len(none) != 0 {
		t.Fatal("unknown class")
	}
}

func TestUploads(t *testing.T) {
	srv := New(Options{})
	srv.maxBody = 64 << 10
	if err := srv.Listen("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	base := srv.URL()
	red := pngBytes(t, 8, 8, color.NRGBA{255, 0, 0, 255})
	blue := pngBytes(t, 8, 8, color.NRGBA{0, 0, 255, 255})
	up := func(fields map[string]string, name string, data []byte) (int, string) {
		code, b := uploadFile(t, base+"/api/upload/image", fields, name, data)
		return code, string(b)
	}
	cases := []struct {
		fields map[string]string
		data   []byte
		want   string
	}{
		{nil, red, `{"name":"a.png","subfolder":"","type":"input"}`},
		{nil, red, `{"name":"a.png","subfolder":"","type":"input"}`},      // identical → reused
		{nil, blue, `{"name":"a (1).png","subfolder":"","type":"input"}`}, // different → renamed
		{nil, blue, `{"name":"a (1).png","subfolder":"","type":"input"}`}, // identical to a (1)
		{map[string]string{"overwrite": "true"}, blue, `{"name":"a.png","subfolder":"","type":"input"}`},
		{map[string]string{"subfolder": "clip", "type": "temp"}, red, `{"name":"a.png","subfolder":"clip","type":"temp"}`},
	}
	for i, c := range cases {
		code, body := up(c.fields, "a.png", c.data)
		if code != 200 || body != c.want {
			t.Fatalf("case %d: %d %s, want %s", i, code, body, c.want)
		}
	}
	if d, _ := srv.OutputFile("input", "", "a.png"); !bytes.Equal(d, blue) {
		t.Fatal("overwrite did not replace a.png")
	}
	if _, ok := srv.OutputFile("temp", "clip", "a.png"); !ok {
		t.Fatal("temp/clip/a.png missing")
	}
	if n := len(srv.Uploads()); n != len(cases) {
		t.Fatalf("%d uploads recorded", n)
	}
	if code, _ := up(map[string]string{"type": "bogus"}, "a.png", red); code != 500 {
		t.Fatalf("bad type: %d", code)
	}
	if code, _ := up(map[string]string{"subfolder": "../x"}, "a.png", red); code != 400 {
		t.Fatalf("escape: %d", code)
	}
	if code, _ := up(nil, "", nil); code != 400 {
		t.Fatalf("no file: %d", code)
	}
	if code, _ := up(nil, "big.png", bytes.Repeat([]byte{1}, 100<<10)); code != 413 {
		t.Fatalf("too large: %d", code)
	}

	// Mask: the original's RGB with the mask's alpha.
	mask := image.NewNRGBA(image.Rect(0, 0, 8, 8))
	mask.SetNRGBA(0, 0, color.NRGBA{0, 0, 0, 255})
	mb, _ := encodePNG(mask)
	code, b := uploadFile(t, base+"/upload/mask", map[string]string{"original_ref": `{"filename":"a.png","subfolder":"","type":"input"}`}, "a-mask.png", mb)
	if code != 200 || string(b) != `{"name":"a-mask.png","subfolder":"","type":"input"}` {
		t.Fatalf("mask: %d %s", code, b)
	}
	md, _ := srv.OutputFile("input", "", "a-mask.png")
	mi, err := png.Decode(bytes.NewReader(md))
	if err != nil {
		t.Fatal(err)
	}
	if c := color.NRGBAModel.Convert(mi.At(0, 0)).(color.NRGBA); c != (color.NRGBA{0, 0, 255, 255}) {
		t.Fatalf("mask pixel 0,0 %v", c)
	}
	if c := color.NRGBAModel.Convert(mi.At(1, 1)).(color.NRGBA); c.A != 0 {
		t.Fatalf("mask pixel 1,1 %v", c)
	}

	// /view variants on the uploaded file.
	resp, body := doReq(t, "GET", base+"/view?filename=a.png&type=input&preview=jpeg;80", nil, nil)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "image/jpeg" {
		t.Fatalf("preview: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if _, err := jpeg.Decode(bytes.NewReader(body)); err != nil {
		t.Fatal(err)
	}
	resp, _ = doReq(t, "GET", base+"/view?filename=a.png&type=input&preview=webp;90", nil, nil)
	if resp.Header.Get("Content-Type") != "image/jpeg" {
		t.Fatalf("webp preview answered as %s", resp.Header.Get("Content-Type"))
	}
	resp, body = doReq(t, "GET", base+"/view?filename=a-mask.png&type=input&channel=a", nil, nil)
	ai, err := png.Decode(bytes.NewReader(body))
	if err != nil || resp.Header.Get("Content-Type") != "image/png" {
		t.Fatalf("channel=a: %v", err)
	}
	if c := color.NRGBAModel.Convert(ai.At(0, 0)).(color.NRGBA); c.A != 255 || c.R != 0 {
		t.Fatalf("alpha channel %v", c)
	}
	resp, body = doReq(t, "GET", base+"/view?filename=a-mask.png&type=input&channel=rgb", nil, nil)
	ri, _ := png.Decode(bytes.NewReader(body))
	if c := color.NRGBAModel.Convert(ri.At(1, 1)).(color.NRGBA); c != (color.NRGBA{0, 0, 255, 255}) {
		t.Fatalf("channel=rgb %v", c)
	}
	resp, body = doReq(t, "GET", base+"/view?filename=a.png&type=input", nil, map[string]string{"Range": "bytes=0-7"})
	if resp.StatusCode != 206 || !bytes.Equal(body, blue[:8]) {
		t.Fatalf("range: %d %x", resp.StatusCode, body)
	}
}

func TestOriginCheck(t *testing.T) {
	srv := Start(t, Options{})
	base := srv.URL()
	hostport := strings.TrimPrefix(base, "http://")
	port := hostport[strings.LastIndex(hostport, ":")+1:]
	cases := []struct {
		host, origin string
		want         int
	}{
		{"", "", 200},
		{"", "http://" + hostport, 200},
		{"", "http://evil.example", 403},
		{"", "http://localhost:" + port, 403},
		{"", "http://127.0.0.1", 200}, // origin without port: ports ignored
		{"localhost:" + port, "http://localhost:" + port, 200},
		{"localhost:" + port, "http://127.0.0.1:" + port, 403},
		{"comfy.example.com", "http://evil.example", 200}, // not loopback: no check
		{"[::1]:" + port, "http://evil.example", 403},
	}
	for _, c := range cases {
		h := map[string]string{}
		if c.host != "" {
			h["Host"] = c.host
		}
		if c.origin != "" {
			h["Origin"] = c.origin
		}
		resp, body := doReq(t, "GET", base+"/api/system_stats", nil, h)
		if resp.StatusCode != c.want || (c.want == 403 && len(body) != 0) {
			t.Errorf("host %q origin %q: %d, want %d", c.host, c.origin, resp.StatusCode, c.want)
		}
	}
	// The WebSocket upgrade is checked too.
	hdr := http.Header{"Origin": {"http://evil.example"}}
	_, resp, err := websocket.DefaultDialer.Dial(wsURL(base), hdr)
	if err == nil || resp == nil || resp.StatusCode != 403 {
		t.Fatalf("ws with foreign origin: %v %v", err, resp)
	}
}

func TestUserdataAndSettings(t *testing.T) {
	srv := Start(t, Options{})
	base := srv.URL()
	resp, b := doReq(t, "POST", base+"/api/userdata/workflows%2Fa.json?overwrite=true", strings.NewReader(`{"x":1}`), nil)
	if resp.StatusCode != 200 || string(b) != `"workflows/a.json"` {
		t.Fatalf("post: %d %s", resp.StatusCode, b)
	}
	resp, b = doReq(t, "GET", base+"/api/userdata/workflows%2Fa.json", nil, nil)
	if resp.StatusCode != 200 || string(b) != `{"x":1}` || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("get: %d %s %s", resp.StatusCode, b, resp.Header.Get("Content-Type"))
	}
	if resp, _ := doReq(t, "GET", base+"/api/userdata/workflows/a.json", nil, nil); resp.StatusCode != 404 {
		t.Fatalf("unencoded slash must not match: %d", resp.StatusCode)
	}
	var list []any
	getJSON(t, base+"/userdata?dir=workflows&recurse=true", &list)
	if !reflect.DeepEqual(list, []any{"a.json"}) {
		t.Fatalf("list %v", list)
	}
	getJSON(t, base+"/userdata?dir=workflows&full_info=true", &list)
	if fi := list[0].(map[string]any); fi["path"] != "a.json" || fi["size"] != 7.0 {
		t.Fatalf("full_info %v", list)
	}
	if code := getJSON(t, base+"/userdata?dir=nope", nil); code != 404 {
		t.Fatalf("missing dir %d", code)
	}
	if code := getJSON(t, base+"/userdata", nil); code != 400 {
		t.Fatalf("no dir %d", code)
	}
	if resp, _ := doReq(t, "POST", base+"/userdata/workflows%2Fa.json?overwrite=false", strings.NewReader("{}"), nil); resp.StatusCode != 409 {
		t.Fatalf("overwrite=false: %d", resp.StatusCode)
	}
	if resp, _ := doReq(t, "POST", base+"/userdata/..%2F..%2Fetc", strings.NewReader("{}"), nil); resp.StatusCode != 403 {
		t.Fatalf("escape: %d", resp.StatusCode)
	}
	resp, b = doReq(t, "POST", base+"/userdata/workflows%2Fa.json/move/workflows%2Fb.json", nil, nil)
	if resp.StatusCode != 200 || string(b) != `"workflows/b.json"` {
		t.Fatalf("move: %d %s", resp.StatusCode, b)
	}
	if resp, _ := doReq(t, "DELETE", base+"/userdata/workflows%2Fb.json", nil, nil); resp.StatusCode != 204 {
		t.Fatalf("delete %d", resp.StatusCode)
	}
	if resp, _ := doReq(t, "GET", base+"/userdata/workflows%2Fb.json", nil, nil); resp.StatusCode != 404 {
		t.Fatalf("after delete %d", resp.StatusCode)
	}
	getJSON(t, base+"/userdata?dir=workflows", &list)
	if len(list) != 0 {
		t.Fatalf("dir still listed files %v", list)
	}
	var raw []string
	for _, r := range srv.Requests() {
		if strings.Contains(r.Path, "%2F") {
			raw = append(raw, r.Method+" "+r.Path)
		}
	}
	if len(raw) == 0 || raw[0] != "POST /api/userdata/workflows%2Fa.json" {
		t.Fatalf("raw paths %v", raw)
	}

	postJSON(t, base+"/settings", map[string]any{"Comfy.A": 1, "Comfy.B": "x"})
	postJSON(t, base+"/settings/Comfy.C", true)
	var st map[string]any
	getJSON(t, base+"/api/settings", &st)
	if !reflect.DeepEqual(st, map[string]any{"Comfy.A": 1.0, "Comfy.B": "x", "Comfy.C": true}) {
		t.Fatalf("settings %v", st)
	}
	_, b = doReq(t, "GET", base+"/settings/Comfy.B", nil, nil)
	_, nb := doReq(t, "GET", base+"/settings/Nope", nil, nil)
	if string(b) != `"x"` || string(nb) != "null" {
		t.Fatalf("setting %s %s", b, nb)
	}
	var users map[string]any
	getJSON(t, base+"/users", &users)
	if users["storage"] != "server" || users["migrated"] != true {
		t.Fatalf("users %v", users)
	}
}

func TestMetadataEndpoints(t *testing.T) {
	srv := Start(t, Options{Name: "gpu-1"})
	base := srv.URL()
	var stats map[string]any
	getJSON(t, base+"/api/system_stats", &stats)
	dev := stats["devices"].([]any)[0].(map[string]any)
	if dev["name"] != "gpu-1" || stats["system"].(map[string]any)["comfyui_version"] == nil {
		t.Fatalf("system_stats %v", stats)
	}
	for p, want := range map[string]string{"/embeddings": "[]", "/api/extensions": "[]"} {
		_, b := doReq(t, "GET", base+p, nil, nil)
		if string(b) != want {
			t.Fatalf("%s: %s", p, b)
		}
	}
	if resp, b := doReq(t, "GET", base+"/nope", nil, nil); resp.StatusCode != 404 || string(b) != "404: Not Found" {
		t.Fatalf("404 %d %s", resp.StatusCode, b)
	}
	if resp, _ := doReq(t, "DELETE", base+"/prompt", nil, nil); resp.StatusCode != 405 {
		t.Fatalf("405 %d", resp.StatusCode)
	}
	if resp, _ := doReq(t, "GET", base+"/", nil, nil); resp.StatusCode != 200 {
		t.Fatalf("/ %d", resp.StatusCode)
	}
	if resp, _ := doReq(t, "OPTIONS", base+"/prompt", nil, nil); resp.StatusCode != 200 {
		t.Fatalf("OPTIONS %d", resp.StatusCode)
	}
}

func TestConcurrentClients(t *testing.T) {
	srv := Start(t, Options{Version: "2026", StepDelay: time.Millisecond})
	base := srv.URL()
	var wg sync.WaitGroup
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sid := fmt.Sprintf("client-%d", i)
			ws := dialWS(t, base, sid)
			ws.next()
			for k := 0; k < 3; k++ {
				id := queuePrompt(t, base, map[string]any{"prompt": samplerWorkflow(fmt.Sprintf("c%d", i)), "client_id": sid})
				fs := ws.untilDone(id)
				for _, f := range fs {
					if pid, ok := f.data["prompt_id"]; ok && f.typ != "status" && pid != id {
						t.Errorf("%s got an event of %v", sid, pid)
					}
				}
				if !contains(types(fs), "execution_success") {
					t.Errorf("%s: %v", sid, types(fs))
				}
			}
		}(i)
	}
	wg.Wait()
	if n := len(srv.Prompts()); n != 18 {
		t.Fatalf("%d prompts", n)
	}
}
