package comfytest

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// allWorkflow is the api-all-twice workflow: EmptyImage→SaveImage;
// LoadImage→ImageInvert→ImageBlur→SaveImage; ImageInvert→SaveImageWebsocket.
func allWorkflow(tag, input string) map[string]any {
	return map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 512, "height": 512, "batch_size": 1, "color": 9334509}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "accept_" + tag + "_empty"}},
		"3": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": input}},
		"4": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"3", 0}}},
		"5": map[string]any{"class_type": "ImageBlur", "inputs": map[string]any{"image": []any{"4", 0}, "blur_radius": 1, "sigma": 1.0}},
		"6": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"5", 0}, "filename_prefix": "accept_" + tag + "_invert"}},
		"7": map[string]any{"class_type": "SaveImageWebsocket", "inputs": map[string]any{"images": []any{"4", 0}}},
	}
}

func TestAllTwiceMatchesTrace(t *testing.T) {
	for _, version := range []string{"2024-08", "2024-12"} {
		t.Run(version, func(t *testing.T) {
			trace := "api-all-twice-comfyui-" + version + ".jsonl"
			srv := Start(t, Options{Version: version, StepDelay: time.Millisecond})
			base := srv.URL()
			tag := "accept-b844f37a34f8"
			input := pngBytes(t, 64, 48, color.NRGBA{102, 40, 114, 255})

			code, b := uploadFile(t, base+"/upload/image", nil, tag+".png", input)
			if code != 200 || !jsonEqual(t, b, []byte(`{"name": "accept-b844f37a34f8.png", "subfolder": "", "type": "input"}`)) {
				t.Fatalf("upload: %d %s", code, b)
			}

			ws := dialWS(t, base, tag)
			var got []frame
			first := ws.next()
			got = append(got, first)
			if first.typ != "status" || first.str("sid") != tag {
				t.Fatalf("first frame %s", first.raw)
			}

			wf := allWorkflow(tag, tag+".png")
			id1 := queuePrompt(t, base, map[string]any{"prompt": wf, "client_id": tag, "prompt_id": "ignored-by-old-servers"})
			if id1 == "ignored-by-old-servers" || len(id1) != 36 {
				t.Fatalf("2024-12 must make its own uuid prompt id, got %q", id1)
			}
			run1 := ws.untilDone(id1)
			got = append(got, run1...)
			id2 := queuePrompt(t, base, map[string]any{"prompt": wf, "client_id": tag})
			run2 := ws.untilDone(id2)
			got = append(got, run2...)

			want := traceSequence(t, trace)
			if !reflect.DeepEqual(types(got), want) {
				t.Fatalf("ws sequence\n got %v\nwant %v", types(got), want)
			}

			// The data of every text frame matches the recording, apart
			// from ids and timestamps.
			rec := traceFrames(t, trace)
			norm := func(f frame, ids ...string) string {
				if f.typ == "<binary>" {
					return f.typ
				}
				d := map[string]any{}
				for k, v := range f.data {
					switch k {
					case "timestamp":
						v = "T"
					case "prompt_id":
						for i, id := range ids {
							if v == id {
								v = fmt.Sprintf("P%d", i)
							}
						}
					case "sid":
						v = "SID"
					}
					d[k] = v
				}
				s := string(mustJSON(obj{{"type", f.typ}, {"data", d}}))
				for _, old := range []string{"accept-b844f37a34f8", "accept-e6ecd92783a1"} {
					s = strings.ReplaceAll(s, old, "TAG")
				}
				return s
			}
			var recIDs []string
			for _, f := range rec {
				if f.typ == "execution_start" {
					recIDs = append(recIDs, f.str("prompt_id"))
				}
			}
			for i := range rec {
				g, w := norm(got[i], id1, id2), norm(rec[i], recIDs...)
				if g != w {
					t.Errorf("frame %d\n got %s\nwant %s", i, g, w)
				}
			}

			// Field order of every text frame equals the recording.
			recData := traceRawData(t, trace)
			k := 0
			for _, f := range got {
				if f.typ == "<binary>" {
					continue
				}
				v, err := decodeOrdered(f.raw)
				if err != nil {
					t.Fatal(err)
				}
				d, _ := v.(obj).get("data")
				if g, w := keyOrder(d), keyOrder(recData[k]); g != w {
					t.Errorf("%s key order\n got %s\nwant %s", f.typ, g, w)
				}
				k++
			}

			// Binary frame: type 1, format 2 (PNG) of the inverted input.
			for _, f := range got {
				if f.typ != "<binary>" {
					continue
				}
				if binary.BigEndian.Uint32(f.raw) != 1 || binary.BigEndian.Uint32(f.raw[4:]) != 2 {
					t.Fatalf("binary header % x", f.raw[:8])
				}
				img, err := png.Decode(bytes.NewReader(f.raw[8:]))
				if err != nil {
					t.Fatal(err)
				}
				if c := color.NRGBAModel.Convert(img.At(32, 24)).(color.NRGBA); c != (color.NRGBA{153, 215, 141, 255}) {
					t.Fatalf("ws PNG centre %v", c)
				}
			}

			// History of run 1: shape of §2.2.
			var hist map[string]map[string]any
			getJSON(t, base+"/history/"+id1, &hist)
			e := hist[id1]
			if e == nil {
				t.Fatalf("no history for %s", id1)
			}
			pr := e["prompt"].([]any)
			if len(pr) != 5 || pr[0] != 0.0 || pr[1] != id1 {
				t.Fatalf("history prompt tuple %v", pr[:2])
			}
			if ex := pr[3].(map[string]any); ex["client_id"] != tag {
				t.Fatalf("extra_data %v", ex)
			}
			st := e["status"].(map[string]any)
			if st["status_str"] != "success" || st["completed"] != true {
				t.Fatalf("status %v", st)
			}
			var names []string
			for _, m := range st["messages"].([]any) {
				mm := m.([]any)
				names = append(names, mm[0].(string))
				if _, ok := mm[1].(map[string]any)["timestamp"].(float64); !ok {
					t.Fatalf("message without timestamp: %v", mm)
				}
			}
			if !reflect.DeepEqual(names, []string{"execution_start", "execution_cached", "execution_success"}) {
				t.Fatalf("messages %v", names)
			}
			outs := e["outputs"].(map[string]any)
			if len(outs) != 2 || outs["2"] == nil || outs["6"] == nil {
				t.Fatalf("outputs %v", outs)
			}
			meta := e["meta"].(map[string]any)
			if m := meta["6"].(map[string]any); m["node_id"] != "6" || m["display_node"] != "6" || m["real_node_id"] != "6" {
				t.Fatalf("meta %v", meta)
			}
			// The cached run's history lists the cached outputs too.
			var hist2 map[string]map[string]any
			getJSON(t, base+"/history/"+id2, &hist2)
			if outs := hist2[id2]["outputs"].(map[string]any); len(outs) != 2 {
				t.Fatalf("cached run outputs %v", outs)
			}

			// /view of both outputs, like the recording.
			resp, body := doReq(t, "GET", base+"/view?filename=accept_"+tag+"_empty_00001_.png&subfolder=&type=output", nil, nil)
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "image/png" {
				t.Fatalf("view: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
			}
			if cd := resp.Header.Get("Content-Disposition"); cd != `filename="accept_`+tag+`_empty_00001_.png"` {
				t.Fatalf("Content-Disposition %q", cd)
			}
			img, err := png.Decode(bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			if img.Bounds().Dx() != 512 || color.NRGBAModel.Convert(img.At(256, 256)).(color.NRGBA) != (color.NRGBA{142, 110, 237, 255}) {
				t.Fatalf("empty image %v %v", img.Bounds(), img.At(256, 256))
			}
			var meta2 map[string]any
			if err := json.Unmarshal([]byte(pngTextChunks(body)["prompt"]), &meta2); err != nil || meta2["2"] == nil {
				t.Fatalf("PNG prompt metadata: %v", err)
			}
			out6, ok := srv.OutputFile("output", "", "accept_"+tag+"_invert_00001_.png")
			if !ok {
				t.Fatal("OutputFile: invert output missing")
			}
			img6, _ := png.Decode(bytes.NewReader(out6))
			if img6.Bounds() != image.Rect(0, 0, 64, 48) {
				t.Fatalf("invert output %v", img6.Bounds())
			}

			// /queue, /history?max_items=1, GET /prompt as recorded.
			resp, body = doReq(t, "GET", base+"/queue", nil, nil)
			if !jsonEqual(t, body, []byte(`{"queue_running": [], "queue_pending": []}`)) {
				t.Fatalf("queue %s", body)
			}
			var last map[string]any
			getJSON(t, base+"/history?max_items=1", &last)
			if len(last) != 1 || last[id2] == nil {
				t.Fatalf("history?max_items=1 keys %v", keys(last))
			}
			_, body = doReq(t, "GET", base+"/prompt", nil, nil)
			if !jsonEqual(t, body, []byte(`{"exec_info": {"queue_remaining": 0}}`)) {
				t.Fatalf("GET /prompt %s", body)
			}
		})
	}
}

func keys[M ~map[string]V, V any](m M) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestInterruptMatchesTrace(t *testing.T) {
	blurring := make(chan struct{}, 1)
	srv := Start(t, Options{StepDelay: 250 * time.Millisecond, OnNodeWork: func(_, node string) {
		if node == "8" {
			blurring <- struct{}{}
		}
	}})
	base := srv.URL()
	ws := dialWS(t, base, "accept-dd9ac5db7e81")
	got := []frame{ws.next()}
	wf := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 256, "height": 256, "batch_size": 1, "color": 5075756}},
		"8": map[string]any{"class_type": "ImageBlur", "inputs": map[string]any{"image": []any{"1", 0}, "blur_radius": 31, "sigma": 5}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"8", 0}, "filename_prefix": "slow"}},
	}
	id := queuePrompt(t, base, map[string]any{"prompt": wf, "client_id": "accept-dd9ac5db7e81"})
	got = append(got, ws.until(func(f frame) bool { return f.typ == "executing" && f.str("node") == "8" })...)
	<-blurring // like the recording: interrupt while node 8 works
	resp, body := doReq(t, "POST", base+"/interrupt", nil, nil)
	if resp.StatusCode != 200 || len(body) != 0 || resp.Header.Get("Content-Type") != "application/octet-stream" {
		t.Fatalf("interrupt: %d %q %q", resp.StatusCode, body, resp.Header.Get("Content-Type"))
	}
	got = append(got, ws.untilDone(id)...)

	want := traceSequence(t, "api-interrupt-comfyui-2024-12.jsonl")
	if !reflect.DeepEqual(types(got), want) {
		t.Fatalf("sequence\n got %v\nwant %v", types(got), want)
	}
	recData := traceRawData(t, "api-interrupt-comfyui-2024-12.jsonl")
	k := 0
	for _, f := range got {
		v, _ := decodeOrdered(f.raw)
		d, _ := v.(obj).get("data")
		if g, w := keyOrder(d), keyOrder(recData[k]); g != w {
			t.Errorf("%s key order\n got %s\nwant %s", f.typ, g, w)
		}
		k++
	}
	var intr frame
	for _, f := range got {
		if f.typ == "execution_interrupted" {
			intr = f
		}
	}
	if intr.str("node_id") != "2" || intr.str("node_type") != "SaveImage" || len(intr.data["executed"].([]any)) != 2 {
		t.Fatalf("execution_interrupted %s", intr.raw)
	}
	if !strings.HasPrefix(string(intr.raw), `{"type":"execution_interrupted","data":{"prompt_id":`) {
		t.Fatalf("field order %s", intr.raw)
	}
	var hist map[string]map[string]any
	getJSON(t, base+"/history/"+id, &hist)
	st := hist[id]["status"].(map[string]any)
	if st["status_str"] != "error" || st["completed"] != false {
		t.Fatalf("status %v", st)
	}
	msgs := st["messages"].([]any)
	if msgs[len(msgs)-1].([]any)[0] != "execution_interrupted" {
		t.Fatalf("messages %v", msgs)
	}
}

func TestErrorBodiesMatchTraces(t *testing.T) {
	bodies := map[string]string{
		"unknown-node":      `{"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}}`,
		"value-not-in-list": `{"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}}, "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}}`,
		"malformed-json":    `{"prompt": {"1": `,
		"no-prompt":         `{"client_id": "x"}`,
	}
	for _, version := range []string{"2024-08", "2024-12"} {
		srv := Start(t, Options{Version: version})
		for name, body := range bodies {
			t.Run(version+"/"+name, func(t *testing.T) {
				raw, err := os.ReadFile(filepath.Join(traceDir, "error-"+name+"-comfyui-"+version+".txt"))
				if err != nil {
					t.Fatal(err)
				}
				text := strings.TrimRight(string(raw), "\n")
				i := strings.LastIndex(text, "\nHTTP ")
				wantBody, wantStatus := strings.TrimRight(text[:i], "\n"), text[i+len("\nHTTP "):]
				resp, got := doReq(t, "POST", srv.URL()+"/prompt", strings.NewReader(body), map[string]string{"Content-Type": "application/json"})
				if fmt.Sprint(resp.StatusCode) != wantStatus {
					t.Fatalf("status %d, want %s (%s)", resp.StatusCode, wantStatus, got)
				}
				if name == "malformed-json" {
					if strings.TrimRight(string(got), "\n") != wantBody || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
						t.Fatalf("body %q (%s), want %q", got, resp.Header.Get("Content-Type"), wantBody)
					}
					return
				}
				if !jsonEqual(t, got, []byte(wantBody)) {
					t.Fatalf("body\n got %s\nwant %s", got, wantBody)
				}
			})
		}
	}
	if n := len(Start(t, Options{}).Prompts()); n != 0 {
		t.Fatalf("rejected prompts recorded: %d", n)
	}
}

func TestViewErrorsMatchTrace(t *testing.T) {
	srv := Start(t, Options{})
	srv.PutInput("", "x.png", pngBytes(t, 2, 2, color.NRGBA{1, 2, 3, 255}))
	cases := map[string]string{
		"view-dotdot":           "/view?filename=..%2Fx.png&type=input",
		"view-badtype":          "/view?filename=x.png&type=bogus",
		"view-subfolder-escape": "/view?filename=x.png&type=input&subfolder=../../etc",
		"view-missing":          "/view?filename=nope.png&type=input",
	}
	raw, err := os.ReadFile(filepath.Join(traceDir, "view-errors-comfyui-2024-12.txt"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
		f := strings.Fields(line)
		name, want := f[0], f[2]
		for _, prefix := range []string{"", "/api"} {
			resp, body := doReq(t, "GET", srv.URL()+prefix+cases[name], nil, nil)
			if fmt.Sprint(resp.StatusCode) != want || len(body) != 0 {
				t.Errorf("%s%s: %d %q, want %s", prefix, name, resp.StatusCode, body, want)
			}
		}
	}
	for path, want := range map[string]int{
		"/view":                                            404, // no filename
		"/view?filename=":                                  400,
		"/view?filename=%2Fetc%2Fpasswd":                   400,
		"/view?filename=x.png&type=input":                  200,
		"/view?filename=x.png%20%5Binput%5D":               200, // " [input]" annotation overrides type
		"/view?filename=x.png&type=input&subfolder=%2Fabs": 403,
		"/view?filename=a..b.png&type=input":               400,
	} {
		resp, _ := doReq(t, "GET", srv.URL()+path, nil, nil)
		if resp.StatusCode != want {
			t.Errorf("%s: %d, want %d", path, resp.StatusCode, want)
		}
	}
}
