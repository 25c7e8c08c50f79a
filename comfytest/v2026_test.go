package comfytest

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"image/color"
	"image/jpeg"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"
)

func samplerWorkflow(prefix string) map[string]any {
	return map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 64, "batch_size": 1, "color": 0x336699}},
		"2": map[string]any{"class_type": "FakeSampler", "inputs": map[string]any{"image": []any{"1", 0}, "steps": 3}},
		"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": prefix}},
	}
}

var browserFlags = map[string]any{"type": "feature_flags", "data": map[string]any{
	"supports_preview_metadata": true, "supports_manager_v4_ui": true, "supports_progress_text_metadata": true}}

func TestV2026SequenceAndPreviews(t *testing.T) {
	srv := Start(t, Options{Version: "2026", StepDelay: time.Millisecond, PreviewBytes: 3 << 20})
	base := srv.URL()
	ws := dialWS(t, base, "")
	st := ws.next()
	sid := st.str("sid")
	if st.typ != "status" || len(sid) != 32 || strings.Contains(sid, "-") {
		t.Fatalf("first frame %s", st.raw)
	}
	ws.sendJSON(browserFlags)
	ff := ws.next()
	if ff.typ != "feature_flags" || string(ff.raw) != `{"type":"feature_flags","data":{"supports_preview_metadata":true,"max_upload_size":104857600}}` {
		t.Fatalf("feature_flags reply %s", ff.raw)
	}
	// A second socket without feature flags gets type-1 previews.
	legacy := dialWS(t, base, "legacy")
	legacy.next()

	pid := uuid.NewString()
	got := queuePrompt(t, base, map[string]any{"prompt": samplerWorkflow("s"), "client_id": sid, "prompt_id": pid})
	if got != pid {
		t.Fatalf("2026 must honour the client prompt_id: %s != %s", got, pid)
	}
	frames := ws.untilDone(pid)
	step := []string{"progress_state", "<binary>", "progress"}
	want := []string{"status", "status", "execution_start", "execution_cached",
		"progress_state", "executing", "progress_state",
		"progress_state", "executing"}
	for i := 0; i < 3; i++ {
		want = append(want, step...)
	}
	want = append(want, "progress_state",
		"progress_state", "executing", "executed", "progress_state",
		"execution_success", "status", "executing")
	if !reflect.DeepEqual(types(frames), want) {
		t.Fatalf("sequence\n got %v\nwant %v", types(frames), want)
	}
	n := 0
	for _, f := range frames {
		switch f.typ {
		case "<binary>":
			n++
			if binary.BigEndian.Uint32(f.raw) != 4 {
				t.Fatalf("want type-4 preview, got %d", binary.BigEndian.Uint32(f.raw))
			}
			ml := binary.BigEndian.Uint32(f.raw[4:])
			var meta map[string]any
			if err := json.Unmarshal(f.raw[8:8+ml], &meta); err != nil {
				t.Fatal(err)
			}
			wantMeta := map[string]any{"node_id": "2", "prompt_id": pid, "display_node_id": "2", "parent_node_id": nil, "real_node_id": "2", "image_type": "image/jpeg"}
			if !reflect.DeepEqual(meta, wantMeta) {
				t.Fatalf("preview metadata %v", meta)
			}
			if !strings.HasPrefix(string(f.raw[8:8+ml]), `{"node_id":"2","prompt_id":`) {
				t.Fatalf("metadata order %s", f.raw[8:8+ml])
			}
			img := f.raw[8+ml:]
			if len(img) < 3<<20 {
				t.Fatalf("preview not padded: %d bytes", len(img))
			}
			if _, err := jpeg.Decode(bytes.NewReader(img)); err != nil {
				t.Fatalf("padded preview does not decode: %v", err)
			}
		case "progress":
			if f.data["node"] != "2" || f.data["max"] != 3.0 || f.data["prompt_id"] != pid {
				t.Fatalf("progress %s", f.raw)
			}
		case "progress_state":
			if f.data["prompt_id"] != pid {
				t.Fatalf("progress_state %s", f.raw)
			}
		}
	}
	if n != 3 {
		t.Fatalf("%d previews", n)
	}
	last := frames[len(frames)-4] // progress_state after SaveImage
	nodes := last.data["nodes"].(map[string]any)
	if len(nodes) != 3 {
		t.Fatalf("final progress_state %s", last.raw)
	}
	for id, v := range nodes {
		m := v.(map[string]any)
		if m["state"] != "finished" || m["node_id"] != id || m["value"] != m["max"] {
			t.Fatalf("node %s state %v", id, m)
		}
	}

	// The flag-less socket of another client got nothing of this job.
	_ = legacy.c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	for {
		_, data, err := legacy.c.ReadMessage()
		if err != nil {
			break
		}
		var m map[string]any
		_ = json.Unmarshal(data, &m)
		if m["type"] != "status" {
			t.Fatalf("other client got %s", data)
		}
	}
}

func TestV2026LegacyPreviewsWithoutFlags(t *testing.T) {
	srv := Start(t, Options{Version: "2026", StepDelay: time.Millisecond})
	ws := dialWS(t, srv.URL(), "old-client")
	ws.next()
	pid := queuePrompt(t, srv.URL(), map[string]any{"prompt": samplerWorkflow("legacy"), "client_id": "old-client"})
	previews := 0
	for _, f := range ws.untilDone(pid) {
		if f.typ == "<binary>" {
			previews++
			if binary.BigEndian.Uint32(f.raw) != 1 || binary.BigEndian.Uint32(f.raw[4:]) != 1 {
				t.Fatalf("want type 1 / JPEG, got % x", f.raw[:8])
			}
			if _, err := jpeg.Decode(bytes.NewReader(f.raw[8:])); err != nil {
				t.Fatal(err)
			}
		}
	}
	if previews != 3 {
		t.Fatalf("%d previews", previews)
	}
}

func TestV2024NoFlagsNoJobs(t *testing.T) {
	srv := Start(t, Options{StepDelay: time.Millisecond})
	ws := dialWS(t, srv.URL(), "c")
	ws.next()
	ws.sendJSON(browserFlags)
	pid := queuePrompt(t, srv.URL(), map[string]any{"prompt": samplerWorkflow("old"), "client_id": "c"})
	for _, f := range ws.untilDone(pid) {
		switch f.typ {
		case "feature_flags", "progress_state":
			t.Fatalf("2024-12 sent %s", f.typ)
		case "<binary>":
			if binary.BigEndian.Uint32(f.raw) != 1 {
				t.Fatalf("2024-12 sent preview type %d", binary.BigEndian.Uint32(f.raw))
			}
		}
	}
	for _, p := range []string{"/api/jobs", "/api/jobs/" + pid, "/features", "/api/features"} {
		if code := getJSON(t, srv.URL()+p, nil); code != 404 {
			t.Errorf("%s: %d, want 404", p, code)
		}
	}
}

type jobsPage struct {
	Jobs       []map[string]any `json:"jobs"`
	Pagination map[string]any   `json:"pagination"`
}

func TestV2026Jobs(t *testing.T) {
	srv := Start(t, Options{Version: "2026", StepDelay: time.Millisecond})
	base := srv.URL()
	ws := dialWS(t, base, "jobs")
	ws.next()

	srv.FailNext("hang")
	idA := uuid.NewString()
	wfExtra := map[string]any{"extra_pnginfo": map[string]any{"workflow": map[string]any{"id": "wf-1"}}, "api_key_comfy_org": "SECRET-KEY"}
	queuePrompt(t, base, map[string]any{"prompt": samplerWorkflow("a"), "client_id": "jobs", "prompt_id": idA, "extra_data": wfExtra})
	ws.until(func(f frame) bool { return f.typ == "executing" && f.str("node") == "1" })
	idB := uuid.NewString()
	time.Sleep(2 * time.Millisecond) // distinct create_time
	queuePrompt(t, base, map[string]any{"prompt": samplerWorkflow("b"), "client_id": "jobs", "prompt_id": idB})

	var page jobsPage
	if code := getJSON(t, base+"/api/jobs?status=in_progress,pending&limit=200&offset=0", &page); code != 200 {
		t.Fatalf("jobs: %d", code)
	}
	if len(page.Jobs) != 2 || page.Pagination["total"] != 2.0 || page.Pagination["has_more"] != false || page.Pagination["limit"] != 200.0 {
		t.Fatalf("jobs page %+v", page)
	}
	byID := map[string]map[string]any{}
	for _, j := range page.Jobs {
		byID[j["id"].(string)] = j
		if _, ok := j["create_time"].(float64); !ok {
			t.Fatalf("job without numeric create_time: %v", j)
		}
	}
	if byID[idA]["status"] != "in_progress" || byID[idB]["status"] != "pending" || byID[idA]["workflow_id"] != "wf-1" || byID[idA]["priority"] != 0.0 {
		t.Fatalf("jobs %v", page.Jobs)
	}
	if page.Jobs[0]["id"] != idB {
		t.Fatalf("default sort is create_time desc: %v", page.Jobs)
	}
	// Without limit, pagination.limit is null.
	var all map[string]any
	getJSON(t, base+"/api/jobs", &all)
	if p := all["pagination"].(map[string]any); p["limit"] != nil {
		t.Fatalf("limit %v", p["limit"])
	}

	// Credentials never show in /queue or /api/jobs, but reached the server.
	_, qb := doReq(t, "GET", base+"/queue", nil, nil)
	if strings.Contains(string(qb), "SECRET-KEY") {
		t.Fatal("/queue leaks api_key_comfy_org")
	}
	if srv.Prompts()[0].ExtraData["api_key_comfy_org"] != "SECRET-KEY" {
		t.Fatalf("Prompts() extra data %v", srv.Prompts()[0].ExtraData)
	}

	// Targeted interrupt of another id is a no-op in 2026.
	postJSON(t, base+"/interrupt", map[string]any{"prompt_id": "not-running"})
	time.Sleep(30 * time.Millisecond)
	var one map[string]any
	getJSON(t, base+"/api/jobs/"+idA, &one)
	if one["status"] != "in_progress" {
		t.Fatalf("job A after foreign interrupt: %v", one)
	}
	postJSON(t, base+"/interrupt", map[string]any{"prompt_id": idA})
	ws.untilDone(idA)
	ws.untilDone(idB)

	getJSON(t, base+"/api/jobs/"+idA, &one)
	if one["status"] != "cancelled" || one["execution_start_time"] == nil || one["execution_end_time"] == nil {
		t.Fatalf("interrupted job %v", one)
	}
	var b map[string]any
	getJSON(t, base+"/api/jobs/"+idB, &b)
	if b["status"] != "completed" || b["outputs_count"] != 1.0 {
		t.Fatalf("job B %v", b)
	}
	pv := b["preview_output"].(map[string]any)
	if pv["nodeId"] != "3" || pv["mediaType"] != "images" || pv["type"] != "output" || pv["filename"] != "b_00001_.png" {
		t.Fatalf("preview_output %v", pv)
	}
	if b["outputs"].(map[string]any)["3"] == nil || b["workflow"].(map[string]any)["prompt"] == nil || b["execution_status"].(map[string]any)["status_str"] != "success" {
		t.Fatalf("job detail %v", b)
	}
	_, hb := doReq(t, "GET", base+"/api/jobs/"+idA, nil, nil)
	if strings.Contains(string(hb), "SECRET-KEY") {
		t.Fatal("/api/jobs/{id} leaks api_key_comfy_org")
	}

	// FailNext("error") → execution_error with every field, job failed.
	srv.FailNext("error")
	idC := uuid.NewString()
	queuePrompt(t, base, map[string]any{"prompt": samplerWorkflow("c"), "client_id": "jobs", "prompt_id": idC})
	var execErr frame
	for _, f := range ws.untilDone(idC) {
		if f.typ == "execution_error" {
			execErr = f
		}
	}
	for _, k := range []string{"prompt_id", "node_id", "node_type", "executed", "exception_message", "exception_type", "traceback", "current_inputs", "current_outputs", "timestamp"} {
		if _, ok := execErr.data[k]; !ok {
			t.Fatalf("execution_error lacks %s: %s", k, execErr.raw)
		}
	}
	// Nodes 1 and 2 are cached from job B's identical prefix? No: the
	// prompts differ only in SaveImage's prefix, so 1 and 2 are cached and
	// the first non-cached node is 3.
	if execErr.str("node_id") != "3" || execErr.str("node_type") != "SaveImage" {
		t.Fatalf("execution_error at %s", execErr.raw)
	}
	var c map[string]any
	getJSON(t, base+"/api/jobs/"+idC, &c)
	if c["status"] != "failed" || c["execution_error"].(map[string]any)["exception_type"] != "RuntimeError" {
		t.Fatalf("failed job %v", c)
	}

	// Filters, sorting, pagination, errors.
	getJSON(t, base+"/api/jobs?status=completed,failed,cancelled&limit=2&offset=1&sort_order=asc", &page)
	if page.Pagination["total"] != 3.0 || len(page.Jobs) != 2 || page.Pagination["has_more"] != false || page.Jobs[0]["id"] != idB {
		t.Fatalf("page %+v", page)
	}
	getJSON(t, base+"/api/jobs?status=completed&limit=1", &page)
	if len(page.Jobs) != 1 || page.Jobs[0]["id"] != idB {
		t.Fatalf("completed %+v", page)
	}
	getJSON(t, base+"/api/jobs?workflow_id=wf-1", &page)
	if len(page.Jobs) != 1 || page.Jobs[0]["id"] != idA {
		t.Fatalf("workflow filter %+v", page)
	}
	getJSON(t, base+"/api/jobs?sort_by=execution_duration", &page)
	if len(page.Jobs) != 3 {
		t.Fatalf("duration sort %+v", page)
	}
	for q, msg := range map[string]string{
		"status=bogus":  "Invalid status value(s): bogus. Valid values: pending, in_progress, completed, failed, cancelled",
		"sort_by=name":  "sort_by must be 'created_at' or 'execution_duration'",
		"sort_order=up": "sort_order must be 'asc' or 'desc'",
		"limit=0":       "limit must be a positive integer",
		"limit=x":       "limit must be an integer",
		"offset=x":      "offset must be an integer",
	} {
		resp, body := doReq(t, "GET", base+"/api/jobs?"+q, nil, nil)
		if resp.StatusCode != 400 || !jsonEqual(t, body, mustJSON(obj{{"error", msg}})) {
			t.Errorf("%s: %d %s", q, resp.StatusCode, body)
		}
	}
	resp, body := doReq(t, "GET", base+"/api/jobs/nope", nil, nil)
	if resp.StatusCode != 404 || !jsonEqual(t, body, []byte(`{"error":"Job not found"}`)) {
		t.Fatalf("missing job: %d %s", resp.StatusCode, body)
	}
	// Registered at /api/jobs, hence also /api/api/jobs, but not /jobs.
	if code := getJSON(t, base+"/api/api/jobs", nil); code != 200 {
		t.Fatalf("/api/api/jobs %d", code)
	}
	if code := getJSON(t, base+"/jobs", nil); code != 404 {
		t.Fatalf("/jobs %d", code)
	}
}

func TestV2026NoPromptAndSecFetch(t *testing.T) {
	srv := Start(t, Options{Version: "2026"})
	code, body := postJSON(t, srv.URL()+"/api/prompt", map[string]any{"client_id": "x"})
	want := `{"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}`
	if code != 400 || !jsonEqual(t, body, []byte(want)) {
		t.Fatalf("%d %s", code, body)
	}
	resp, b := doReq(t, "GET", srv.URL()+"/api/system_stats", nil, map[string]string{"Sec-Fetch-Site": "cross-site"})
	if resp.StatusCode != 403 || len(b) != 0 {
		t.Fatalf("cross-site: %d %q", resp.StatusCode, b)
	}
	resp, _ = doReq(t, "GET", srv.URL()+"/api/system_stats", nil, map[string]string{"Sec-Fetch-Site": "same-origin"})
	if resp.StatusCode != 200 {
		t.Fatalf("same-origin: %d", resp.StatusCode)
	}
	var feats map[string]any
	getJSON(t, srv.URL()+"/api/features", &feats)
	if feats["supports_preview_metadata"] != true || feats["max_upload_size"] != 104857600.0 {
		t.Fatalf("features %v", feats)
	}
	// Old servers ignore Sec-Fetch-Site.
	old := Start(t, Options{})
	resp, _ = doReq(t, "GET", old.URL()+"/system_stats", nil, map[string]string{"Sec-Fetch-Site": "cross-site"})
	if resp.StatusCode != 200 {
		t.Fatalf("2024-12 cross-site: %d", resp.StatusCode)
	}
}

func TestV2026PreviewImageAndNoClient(t *testing.T) {
	srv := Start(t, Options{Version: "2026", StepDelay: time.Millisecond})
	watcher := dialWS(t, srv.URL(), "watcher")
	watcher.next()
	wf := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 2, "color": 0}},
		"2": map[string]any{"class_type": "FakeSampler", "inputs": map[string]any{"image": []any{"1", 0}}},
		"9": map[string]any{"class_type": "PreviewImage", "inputs": map[string]any{"images": []any{"2", 0}}},
	}
	// No client_id: progress, progress_state and previews are broadcast;
	// executing/executed/execution_* are not sent.
	queuePrompt(t, srv.URL(), map[string]any{"prompt": wf})
	var got []string
	for {
		f := watcher.next()
		got = append(got, f.typ)
		if f.typ == "status" && f.data["status"].(map[string]any)["exec_info"].(map[string]any)["queue_remaining"] == 0.0 {
			break
		}
	}
	for _, typ := range got {
		switch typ {
		case "executing", "executed", "execution_start", "execution_success":
			t.Fatalf("no-client job sent %s: %v", typ, got)
		}
	}
	if strings.Count(strings.Join(got, " "), "progress ") < 3 || !contains(got, "<binary>") {
		t.Fatalf("no-client job should broadcast progress and previews: %v", got)
	}
	var hist map[string]map[string]any
	getJSON(t, srv.URL()+"/history", &hist)
	for _, e := range hist {
		imgs := e["outputs"].(map[string]any)["9"].(map[string]any)["images"].([]any)
		if len(imgs) != 2 {
			t.Fatalf("preview images %v", imgs)
		}
		first := imgs[0].(map[string]any)
		name := first["filename"].(string)
		if first["type"] != "temp" || !strings.HasPrefix(name, "ComfyUI_temp_") || !strings.HasSuffix(name, "_00001_.png") || len(name) != len("ComfyUI_temp_abcde_00001_.png") {
			t.Fatalf("temp ref %v", first)
		}
		if _, ok := srv.OutputFile("temp", "", name); !ok {
			t.Fatalf("temp file %s missing", name)
		}
		resp, _ := doReq(t, "GET", srv.URL()+"/api/view?filename="+name+"&type=temp&subfolder=", nil, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("view temp %d", resp.StatusCode)
		}
	}
	_ = websocket.BinaryMessage
	_ = color.NRGBA{}
}
