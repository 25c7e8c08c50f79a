package comfytest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"image"
	"image/color"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

const traceDir = "testdata/wire-traces"

// frame is one WebSocket frame received by a test client.
type frame struct {
	typ  string         // JSON "type", or "<binary>"
	data map[string]any // JSON "data"
	raw  []byte
}

func (f frame) str(k string) string {
	s, _ := f.data[k].(string)
	return s
}

type wsClient struct {
	t testing.TB
	c *websocket.Conn
}

func wsURL(base string) string { return "ws" + strings.TrimPrefix(base, "http") + "/ws" }

func dialWS(t testing.TB, base, clientID string) *wsClient {
	t.Helper()
	u := wsURL(base)
	if clientID != "" {
		u += "?clientId=" + clientID
	}
	c, resp, err := websocket.DefaultDialer.Dial(u, nil)
	if err != nil {
		t.Fatalf("dial %s: %v (resp %v)", u, err, resp)
	}
	t.Cleanup(func() { c.Close() })
	return &wsClient{t: t, c: c}
}

func (w *wsClient) next() frame {
	w.t.Helper()
	_ = w.c.SetReadDeadline(time.Now().Add(15 * time.Second))
	mt, data, err := w.c.ReadMessage()
	if err != nil {
		w.t.Fatalf("ws read: %v", err)
	}
	if mt == websocket.BinaryMessage {
		return frame{typ: "<binary>", raw: data}
	}
	var m struct {
		Type string         `json:"type"`
		Data map[string]any `json:"data"`
	}
	if err := json.Unmarshal(data, &m); err != nil {
		w.t.Fatalf("ws frame %q: %v", data, err)
	}
	return frame{typ: m.Type, data: m.Data, raw: data}
}

// untilDone reads frames up to and including executing{node:null} of id.
func (w *wsClient) untilDone(id string) []frame {
	w.t.Helper()
	var out []frame
	for {
		f := w.next()
		out = append(out, f)
		if f.typ == "executing" && f.data["node"] == nil && f.str("prompt_id") == id {
			return out
		}
	}
}

// until reads frames up to and including the first that matches.
func (w *wsClient) until(match func(frame) bool) []frame {
	w.t.Helper()
	var out []frame
	for {
		f := w.next()
		out = append(out, f)
		if match(f) {
			return out
		}
	}
}

func (w *wsClient) sendJSON(v any) {
	w.t.Helper()
	if err := w.c.WriteJSON(v); err != nil {
		w.t.Fatalf("ws write: %v", err)
	}
}

func types(fs []frame) []string {
	out := make([]string, len(fs))
	for i, f := range fs {
		out[i] = f.typ
	}
	return out
}

func doReq(t testing.TB, method, url string, body io.Reader, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

func postJSON(t testing.TB, url string, v any) (int, []byte) {
	t.Helper()
	var body io.Reader
	switch x := v.(type) {
	case string:
		body = strings.NewReader(x)
	case []byte:
		body = bytes.NewReader(x)
	default:
		body = bytes.NewReader(mustJSON(v))
	}
	resp, b := doReq(t, "POST", url, body, map[string]string{"Content-Type": "application/json"})
	return resp.StatusCode, b
}

func getJSON(t testing.TB, url string, out any) int {
	t.Helper()
	resp, b := doReq(t, "GET", url, nil, nil)
	if out != nil && resp.StatusCode == 200 {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("GET %s: %v in %q", url, err, b)
		}
	}
	return resp.StatusCode
}

// queuePrompt posts body to /prompt and returns the prompt_id.
func queuePrompt(t testing.TB, base string, body map[string]any) string {
	t.Helper()
	code, b := postJSON(t, base+"/prompt", body)
	if code != 200 {
		t.Fatalf("POST /prompt: %d %s", code, b)
	}
	var r struct {
		PromptID string `json:"prompt_id"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	return r.PromptID
}

func pngBytes(t testing.TB, w, h int, c color.NRGBA) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.SetNRGBA(x, y, c)
		}
	}
	b, err := encodePNG(img)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func uploadFile(t testing.TB, url string, fields map[string]string, filename string, data []byte) (int, []byte) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	for k, v := range fields {
		_ = mw.WriteField(k, v)
	}
	if filename != "" {
		fw, err := mw.CreateFormFile("image", filename)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = fw.Write(data)
	}
	mw.Close()
	resp, b := doReq(t, "POST", url, &buf, map[string]string{"Content-Type": mw.FormDataContentType()})
	return resp.StatusCode, b
}

// traceLines reads a recorded JSONL trace.
func traceLines(t testing.TB, name string) []map[string]any {
	t.Helper()
	f, err := os.Open(filepath.Join(traceDir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out = append(out, m)
	}
	return out
}

// traceSequence is the summary line's ws_sequence.
func traceSequence(t testing.TB, name string) []string {
	t.Helper()
	for _, l := range traceLines(t, name) {
		if l["kind"] == "summary" {
			var seq []string
			for _, x := range l["ws_sequence"].([]any) {
				seq = append(seq, x.(string))
			}
			return seq
		}
	}
	t.Fatalf("%s: no summary line", name)
	return nil
}

// traceFrames returns the recorded ws_text frames as type + data.
func traceFrames(t testing.TB, name string) []frame {
	t.Helper()
	var out []frame
	for _, l := range traceLines(t, name) {
		switch l["kind"] {
		case "ws_text":
			d, _ := l["data"].(map[string]any)
			out = append(out, frame{typ: l["type"].(string), data: d})
		case "ws_binary":
			out = append(out, frame{typ: "<binary>"})
		}
	}
	return out
}

// traceRawData returns the "data" of every recorded ws_text frame as an
// ordered value, to compare key order.
func traceRawData(t testing.TB, name string) []any {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(traceDir, name))
	if err != nil {
		t.Fatal(err)
	}
	var out []any
	for _, line := range bytes.Split(bytes.TrimSpace(raw), []byte("\n")) {
		v, err := decodeOrdered(line)
		if err != nil {
			t.Fatal(err)
		}
		o := v.(obj)
		if k, _ := o.get("kind"); k == "ws_text" {
			d, _ := o.get("data")
			out = append(out, d)
		}
	}
	return out
}

// keyOrder renders the object keys of v, recursively, in order.
func keyOrder(v any) string {
	switch t := v.(type) {
	case obj:
		var b strings.Builder
		b.WriteString("{")
		for _, e := range t {
			b.WriteString(e.K + ":" + keyOrder(e.V) + ",")
		}
		return b.String() + "}"
	case []any:
		var b strings.Builder
		b.WriteString("[")
		for _, e := range t {
			b.WriteString(keyOrder(e) + ",")
		}
		return b.String() + "]"
	}
	return ""
}

func jsonEqual(t testing.TB, got, want []byte) bool {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("got is not JSON: %q", got)
	}
	if err := json.Unmarshal(want, &w); err != nil {
		t.Fatalf("want is not JSON: %q", want)
	}
	return reflect.DeepEqual(g, w)
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
