package comfy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// decodeHead is ScanEvent's contract written with encoding/json.
func decodeHead(b []byte) (Head, bool) {
	var h Head
	var top map[string]json.RawMessage
	if json.Unmarshal(b, &top) != nil || top == nil {
		return h, false
	}
	t, ok := top["type"]
	if !ok || t[0] != '"' || json.Unmarshal(t, &h.Type) != nil || h.Type == "" {
		return h, false
	}
	d, ok := top["data"]
	if !ok || string(d) == "null" {
		return h, true
	}
	if d[0] != '{' {
		return h, false
	}
	var data map[string]json.RawMessage
	if json.Unmarshal(d, &data) != nil {
		return h, false
	}
	str := func(key string, dst *string) bool {
		v, ok := data[key]
		if !ok || string(v) == "null" {
			return true
		}
		return v[0] == '"' && json.Unmarshal(v, dst) == nil
	}
	if !str("prompt_id", &h.PromptID) || !str("display_node", &h.DisplayNode) {
		return h, false
	}
	if v, ok := data["node"]; ok {
		switch v[0] {
		case '"':
			h.NodeKind = NodeString
			if json.Unmarshal(v, &h.Node) != nil {
				return h, false
			}
		case 'n':
			h.NodeKind = NodeNull
		default:
			h.NodeKind = NodeOther
		}
	}
	return h, true
}

func checkScan(t *testing.T, b []byte) {
	t.Helper()
	got, ok := ScanEvent(b)
	want, wantOK := decodeHead(b)
	if ok != wantOK {
		t.Fatalf("%q: ScanEvent ok=%v, encoding/json says %v", b, ok, wantOK)
	}
	if !ok {
		return
	}
	span := got.PromptIDStart != 0 || got.PromptIDEnd != 0
	got.PromptIDStart, got.PromptIDEnd = 0, 0
	if got != want {
		t.Fatalf("%q:\nScanEvent  %+v\nencoding/json %+v", b, got, want)
	}
	// A known prompt_id changes nothing but where the string comes from
	// (also one whose raw bytes look like an escaped form of another).
	for _, known := range []string{want.PromptID, `\u0041`, "A", `a\nb`} {
		k, _ := ScanEventKnown(b, known)
		k.PromptIDStart, k.PromptIDEnd = 0, 0
		if k != want {
			t.Fatalf("%q known %q:\nScanEventKnown %+v\nencoding/json  %+v", b, known, k, want)
		}
	}
	// So does the last event's Head, for every string it may return.
	for _, last := range []Head{
		{PromptID: want.PromptID, Node: want.Node, DisplayNode: want.DisplayNode},
		{PromptID: `\u0041`, Node: "A", DisplayNode: `a\nb`},
		{Node: want.DisplayNode, DisplayNode: want.Node},
	} {
		k, _ := ScanEventLike(b, &last)
		k.PromptIDStart, k.PromptIDEnd = 0, 0
		if k != want {
			t.Fatalf("%q last %+v:\nScanEventLike %+v\nencoding/json %+v", b, last, k, want)
		}
	}
	if !span {
		return
	}
	// The span is the prompt_id the decoder reads: replacing it changes
	// exactly that.
	h, _ := ScanEvent(b)
	for _, id := range []string{"gw-\"id\"\n", ""} {
		nb := h.WithPromptID(b, id)
		w, ok := decodeHead(nb)
		if !ok || w.PromptID != id || w.Type != want.Type || w.Node != want.Node || w.DisplayNode != want.DisplayNode {
			t.Fatalf("%q with prompt_id %q: %q decodes to %+v (ok=%v)", b, id, nb, w, ok)
		}
	}
}

func TestScanEvent(t *testing.T) {
	for _, in := range []string{
		`{"type": "progress", "data": {"value": 3, "max": 20, "prompt_id": "p1", "node": "3"}}`,
		`{"data": {"node": null, "prompt_id": "p1"}, "type": "executing"}`,
		`{"type":"executing","data":{"node":"12","display_node":"12:3","prompt_id":"p1"}}`,
		`{"type":"executed","data":{"node":"9","output":{"images":[{"filename":"a\"}.png","subfolder":"","type":"output"}]},"prompt_id":"p2"}}`,
		`{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}},"sid":"abc"}}`,
		`{"type":"execution_start"}`, `{"type":"x","data":null}`,
		`{"type":"x","data":[]}`, `{"type":"x","data":"s"}`, `{"type":""}`, `{"type":null}`, `{"type":1}`,
		`{"type":"a","data":{"prompt_id":5}}`, `{"type":"a","data":{"prompt_id":null,"node":7}}`,
		`{"type":"a","data":{"display_node":{}}}`, `{"type":"a","data":{"node":{"x":[1,2]}}}`,
		`{"typ\u0065":"pro\u0067ress","d\u0061ta":{"prompt\u005fid":"\ud83d\ude00-\u00e9\/x","node":"\ud800"}}`,
		`{"type":"a","type":"b","data":{"prompt_id":"1"},"data":{"node":"2"}}`,
		`{"type":"a","data":{"prompt_id":"1","prompt_id":"2"}}`,
		`{"Type":"a"}`, `{"type":"a","data":{"Prompt_ID":"x"}}`,
		" \t\r\n{ \"type\" : \"a\" , \"data\" : { \"prompt_id\" : \"p\" } } \n",
		`{"type":"a"} x`, `{"type":"a",}`, `{"type":"a" "data":{}}`, `{"type":"a","data":{"node":"1",}}`,
		`{"type":"a","n":01}`, `{"type":"a","n":-}`, `{"type":"a","n":1.}`, `{"type":"a","n":1e}`, `{"type":"a","n":-0.5E+7}`,
		`{"type":"a","s":"\x"}`, `{"type":"a","s":"\u12"}`, "{\"type\":\"a\",\"s\":\"\x01\"}", "{\"type\":\"\xff\xfe\"}",
		`{"type":"a","t":tru}`, `{"type":"a","t":[true,false,null,{}]}`, `[{"type":"a"}]`, `"x"`, ``, `{`, `{"type":"a"`,
		`{"type":"a","data":{"prompt_id":"` + strings.Repeat("\\\\", 10) + `"}}`,
		`{"type":"a","deep":` + strings.Repeat("[", 9999) + strings.Repeat("]", 9999) + `}`,
		`{"type":"a","deep":` + strings.Repeat("[", 10000) + strings.Repeat("]", 10000) + `}`,
	} {
		checkScan(t, []byte(in))
	}
}

// The wire traces of real ComfyUI servers: every event scans like
// encoding/json reads it.
func traceFrames(t testing.TB) [][]byte {
	files, _ := filepath.Glob("../comfytest/testdata/wire-traces/*.jsonl")
	if len(files) == 0 {
		t.Fatal("no wire traces")
	}
	var out [][]byte
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			var line struct {
				Kind string          `json:"kind"`
				Type string          `json:"type"`
				Data json.RawMessage `json:"data"`
			}
			if json.Unmarshal(sc.Bytes(), &line) != nil || line.Kind != "ws_text" {
				continue
			}
			m := Message{Type: line.Type, Data: line.Data}
			out = append(out, m.Encode(), append([]byte(nil), sc.Bytes()...))
		}
		f.Close()
	}
	return out
}

func TestScanEventTraces(t *testing.T) {
	for _, f := range eventFrames {
		checkScan(t, []byte(f.frame))
	}
	frames := traceFrames(t)
	for _, b := range frames {
		checkScan(t, b)
	}
	t.Logf("%d frames", len(frames))
}

func FuzzScanEvent(f *testing.F) {
	for _, e := range eventFrames {
		f.Add([]byte(e.frame))
	}
	for _, b := range traceFrames(f) {
		f.Add(b)
	}
	f.Add([]byte(`{"type":"executing","data":{"node":null,"display_node":"\u0031","prompt_id":"\ud83d"}}`))
	f.Add([]byte(`{"type":"progress","data":{"prompt_id":"\u0041","node":"3"}}`))
	f.Add([]byte(`{"type":"progress","data":{"prompt_id":"a\nb","node":"3"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		checkScan(t, b)
	})
}

func BenchmarkScanEvent(b *testing.B) {
	frame := []byte(`{"type": "progress", "data": {"value": 17, "max": 1000, "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "node": "3"}}`)
	b.SetBytes(int64(len(frame)))
	for i := 0; i < b.N; i++ {
		if _, ok := ScanEvent(frame); !ok {
			b.Fatal("not ok")
		}
	}
}

// BenchmarkDecodeEvent is what routing an event cost before ScanEvent.
func BenchmarkDecodeEvent(b *testing.B) {
	frame := []byte(`{"type": "progress", "data": {"value": 17, "max": 1000, "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "node": "3"}}`)
	b.SetBytes(int64(len(frame)))
	for i := 0; i < b.N; i++ {
		m, err := ParseMessage(frame)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.Common(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkScanProgressState scans the progress_state frame a 2026 server
// sends with every step (two nodes started).
func BenchmarkScanProgressState(b *testing.B) {
	frame := []byte(`{"type": "progress_state", "data": {"prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "nodes": {"1": {"value": 1, "max": 1, "state": "finished", "node_id": "1", "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "display_node_id": "1", "parent_node_id": null, "real_node_id": "1"}, "2": {"value": 17, "max": 1000, "state": "running", "node_id": "2", "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "display_node_id": "2", "parent_node_id": null, "real_node_id": "2"}}}}`)
	b.SetBytes(int64(len(frame)))
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := ScanEvent(frame); !ok {
			b.Fatal("not ok")
		}
	}
}

// eventFrames are the events a GPU server sends most, as a 2026 ComfyUI
// writes them (Python's json.dumps: ", " and ": "; see the wire traces):
// per step a progress and a progress_state (here with three nodes
// started), per node an executing, per output node an executed.
var eventFrames = []struct{ name, frame string }{
	{"progress", `{"type": "progress", "data": {"value": 17, "max": 20, "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "node": "3"}}`},
	{"progress_state", `{"type": "progress_state", "data": {"prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "nodes": {` +
		`"4": {"value": 1, "max": 1, "state": "finished", "node_id": "4", "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "display_node_id": "4", "parent_node_id": null, "real_node_id": "4"}, ` +
		`"6": {"value": 1, "max": 1, "state": "finished", "node_id": "6", "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "display_node_id": "6", "parent_node_id": null, "real_node_id": "6"}, ` +
		`"3": {"value": 17, "max": 20, "state": "running", "node_id": "3", "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "display_node_id": "3", "parent_node_id": null, "real_node_id": "3"}}}}`},
	{"executing", `{"type": "executing", "data": {"node": "3", "display_node": "3", "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10"}}`},
	{"executed", `{"type": "executed", "data": {"node": "9", "display_node": "9", "output": {"images": [` +
		`{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}, {"filename": "ComfyUI_00002_.png", "subfolder": "", "type": "output"}]}, ` +
		`"prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10"}}`},
}

// BenchmarkScanFrames scans each of eventFrames the way the gateway's
// stream reader does: knowing the prompt_id it saw last. The -compact
// cases are the same frames without spaces, as comfytest (the fake GPU of
// the bench package) writes them.
func BenchmarkScanFrames(b *testing.B) {
	const known = "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10"
	cases := eventFrames
	for _, f := range eventFrames {
		var c bytes.Buffer
		if err := json.Compact(&c, []byte(f.frame)); err != nil {
			b.Fatal(err)
		}
		cases = append(cases, struct{ name, frame string }{f.name + "-compact", c.String()})
	}
	for _, f := range cases {
		b.Run(f.name, func(b *testing.B) {
			frame := []byte(f.frame)
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				if h, ok := ScanEventKnown(frame, known); !ok || h.PromptID != known {
					b.Fatal("not ok")
				}
			}
		})
	}
}

// Strings are read 8 bytes at a time: every kind of byte that ends a run
// of plain content, at every position of strings as long as a few words,
// reads as encoding/json reads it — in a key, in the values ScanEvent
// returns and nested in data.
func TestScanEventStringBytes(t *testing.T) {
	for _, special := range []string{`"`, `\"`, `\\`, `\/`, `\n`, `\u00e9`, `\ud83d\ude00`, `\ud83d`, "\x01", "\x1f", "\x7f", " ", "é", "\xff", "\xe2\x82", `\x`, `\u12`} {
		for n := 0; n < 26; n++ {
			for at := 0; at <= n; at++ {
				s := strings.Repeat("a", at) + special + strings.Repeat("b", n-at)
				for _, frame := range []string{
					`{"type":"progress","data":{"prompt_id":"` + s + `","node":"` + s + `","display_node":"` + s + `"}}`,
					`{"type":"` + s + `","data":{"` + s + `":1,"nodes":{"` + s + `":{"state":"` + s + `"}},"` + s + `":["` + s + `"]}}`,
					`{"type":"x","data":{"v":"` + s, // cut short
				} {
					checkScan(t, []byte(frame))
				}
			}
		}
	}
}

// The gateway scans every frame of every job: scanning the events a GPU
// server sends most allocates nothing when their prompt_id is the one the
// reader knows, nor, with ScanEventLike, when their node ids (of any
// length) are the last event's.
func TestScanEventLikeAllocs(t *testing.T) {
	frame := []byte(`{"type": "progress", "data": {"value": 7, "max": 20, "prompt_id": "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10", "node": "45:12", "display_node": "45"}}`)
	first, ok := ScanEvent(frame)
	if !ok {
		t.Fatal("bad frame")
	}
	if n := testing.AllocsPerRun(100, func() { ScanEventLike(frame, &first) }); n != 0 {
		t.Errorf("%v allocations", n)
	}
	if n := testing.AllocsPerRun(100, func() { ScanEventKnown(frame, first.PromptID) }); n == 0 {
		t.Errorf("ScanEventKnown made no copy of the node ids: the test shows nothing")
	}
}

// The gateway scans every frame of every job: scanning the events a GPU
// server sends most allocates nothing when their prompt_id is the one the
// reader knows.
func TestScanEventAllocs(t *testing.T) {
	const known = "0b6c3f6e-8d4f-4c1e-9f3a-2f1d5c7e9a10"
	for _, f := range eventFrames {
		frame := []byte(f.frame)
		if n := testing.AllocsPerRun(100, func() { ScanEventKnown(frame, known) }); n != 0 {
			t.Errorf("%s: %v allocations", f.name, n)
		}
	}
}
