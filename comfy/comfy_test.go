package comfy

import (
	"bytes"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
)

// The /view rules, with the statuses real ComfyUI gave in
// shared/wire-traces/view-errors-*.txt.
func TestParseViewFollowsComfyUI(t *testing.T) {
	cases := []struct {
		query  string
		status int
		ref    FileRef
	}{
		{"filename=../secret.png&type=output", 400, FileRef{}},             // view-dotdot
		{"filename=a.png&type=bogus", 400, FileRef{}},                      // view-badtype
		{"filename=a.png&subfolder=../../etc&type=output", 403, FileRef{}}, // view-subfolder-escape
		{"filename=/etc/passwd", 400, FileRef{}},
		{"subfolder=x", 404, FileRef{}},
		{"filename=a.png", 0, FileRef{Filename: "a.png", Type: "output"}},
		{"filename=a.png [temp]&type=output", 0, FileRef{Filename: "a.png", Type: "temp"}},
		{"filename=a.png&subfolder=x/y&type=input", 0, FileRef{Filename: "a.png", Subfolder: "x/y", Type: "input"}},
		{"filename=a.png&subfolder=/abs", 403, FileRef{}},
		// One spelling per file: what ComfyUI would clean is refused.
		{"filename=a.png&subfolder=x/./y&type=input", 400, FileRef{}},
		{"filename=a.png&subfolder=x/../y", 400, FileRef{}},
		{"filename=a.png&subfolder=comfyume/bob/../alice", 400, FileRef{}},
		{"filename=a.png&subfolder=x//y", 400, FileRef{}},
		{"filename=a.png&subfolder=x/", 400, FileRef{}},
		{"filename=a.png&subfolder=x%5Cy", 400, FileRef{}},
		{"filename=a%0A.png", 400, FileRef{}},
		{"filename=a.png&subfolder=x%01", 400, FileRef{}},
		{"filename=" + strings.Repeat("a", 256), 400, FileRef{}},
	}
	for _, c := range cases {
		q, _ := url.ParseQuery(c.query)
		v, st := ParseView(q)
		if st != c.status {
			t.Errorf("%s: status %d, want %d", c.query, st, c.status)
			continue
		}
		if st == 0 && v.FileRef != c.ref {
			t.Errorf("%s: ref %+v, want %+v", c.query, v.FileRef, c.ref)
		}
	}
}

// The frontend sends preview=webp;90 unescaped; it must survive parsing.
func TestParseQueryKeepsSemicolons(t *testing.T) {
	q := ParseQuery("filename=a%20b.png&subfolder=&type=output&preview=webp;90&rand=0.5")
	v, st := ParseView(q)
	if st != 0 || v.Preview != "webp;90" || v.Filename != "a b.png" || v.Type != "output" {
		t.Fatalf("%+v %d", v, st)
	}
}

func TestAnnotatedRoundTrip(t *testing.T) {
	for in, want := range map[string]FileRef{
		"cat.png":                      {Filename: "cat.png", Type: "input"},
		"clipspace/mask-1.png [input]": {Filename: "mask-1.png", Subfolder: "clipspace", Type: "input"},
		"a/b/out.png [output]":         {Filename: "out.png", Subfolder: "a/b", Type: "output"},
		" pasted/image (1).png ":       {Filename: "image (1).png", Subfolder: "pasted", Type: "input"},
	} {
		got, err := ParseAnnotated(in, TypeInput)
		if err != nil || got != want {
			t.Errorf("%q: %+v %v, want %+v", in, got, err, want)
		}
	}
	if s := (FileRef{Filename: "o.png", Subfolder: "s", Type: "output"}).Annotated(); s != "s/o.png [output]" {
		t.Errorf("Annotated: %q", s)
	}
}

// A file value that names a file in more than one way, or outside its
// directory, is refused, whatever the spelling (issue 8, finding 1: a value
// climbing out of the user's own job folder reached another job's file).
func TestParseAnnotatedRefusesEscapes(t *testing.T) {
	for _, in := range []string{
		"comfyume/bob-job/../../alice-job/output/ComfyUI_00001_.png [output]",
		"../secret.png", "a/../b.png", "./a.png", "a/./b.png", "a//b.png", "/etc/passwd",
		"a\\..\\b.png", "a\x00b.png", "a/b\nc.png", "sub/", "", "..", ".",
		"k1/../pic.png", strings.Repeat("d/", 40) + "x.png", strings.Repeat("x", 256) + ".png",
		"bad\xff.png",
	} {
		if r, err := ParseAnnotated(in, TypeInput); err == nil {
			t.Errorf("%q accepted as %+v", in, r)
		}
	}
}

// A type-1 preview becomes type 4 with metadata and back, keeping the image.
func TestPreviewFrames(t *testing.T) {
	img := []byte("\xff\xd8jpegbytes")
	t1 := Preview{ImageType: "image/jpeg", Image: img}.EncodeType1()
	if !bytes.Equal(t1[:8], []byte{0, 0, 0, 1, 0, 0, 0, 1}) {
		t.Fatalf("type-1 header % x", t1[:8])
	}
	p, err := ParsePreview(t1)
	if err != nil || p.Metadata != nil || !bytes.Equal(p.Image, img) {
		t.Fatalf("parse type 1: %v %+v", err, p)
	}
	t4 := p.EncodeType4(PreviewMetadata{NodeID: "2", PromptID: "pid", DisplayNodeID: "2", RealNodeID: "2"})
	p4, err := ParsePreview(t4)
	if err != nil || p4.Metadata == nil || p4.Metadata.PromptID != "pid" || p4.Metadata.ImageType != "image/jpeg" || !bytes.Equal(p4.Image, img) {
		t.Fatalf("parse type 4: %v %+v", err, p4)
	}
	var md map[string]any
	n := int(t4[7]) | int(t4[6])<<8
	if err := json.Unmarshal(t4[8:8+n], &md); err != nil || md["parent_node_id"] != nil {
		t.Fatalf("metadata JSON %s", t4[8:8+n])
	}
	for _, bad := range [][]byte{nil, {0, 0, 0, 4}, {0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff, '{'}, {0, 0, 0, 4, 0, 0, 0, 1, 'x'}} {
		if _, err := ParsePreview(bad); err == nil {
			t.Errorf("bad frame % x accepted", bad)
		}
	}
}

func TestTextFrameLayouts(t *testing.T) {
	tf := TextFrame{PromptID: "p", NodeID: "12:5", Text: []byte("hello")}
	for _, withID := range []bool{false, true} {
		got, err := ParseText(tf.Encode(withID), withID)
		if err != nil || got.NodeID != "12:5" || string(got.Text) != "hello" || (withID && got.PromptID != "p") {
			t.Fatalf("layout %v: %+v %v", withID, got, err)
		}
	}
	if _, err := ParseText([]byte{0, 0, 0, 3, 0, 0, 1, 0, 'x'}, false); err == nil {
		t.Fatal("truncated text frame accepted")
	}
}

// A relayed prompt keeps every key the client sent, with the gateway's ids.
func TestPromptBodyPreservesClientKeys(t *testing.T) {
	body := `{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":512},"_meta":{"title":"E"},"is_changed":["x"]}},
	"client_id":"browser","extra_data":{"extra_pnginfo":{"workflow":{"id":"wf"}},"auth_token_comfy_org":"tok"},
	"partial_execution_targets":["1"],"front":true}`
	pr, berr := ParsePromptRequest([]byte(body))
	if berr != nil {
		t.Fatal(berr)
	}
	if pr.ClientID != "browser" || !pr.Front {
		t.Fatalf("%+v", pr)
	}
	out, err := pr.Body("pid", "gw", SensitiveExtraData...)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	_ = json.Unmarshal(out, &m)
	if m["prompt_id"] != "pid" || m["client_id"] != "gw" || m["partial_execution_targets"] == nil || m["front"] != true {
		t.Fatalf("body %s", out)
	}
	ed := m["extra_data"].(map[string]any)
	if _, ok := ed["auth_token_comfy_org"]; ok {
		t.Fatalf("credential forwarded: %s", out)
	}
	node := m["prompt"].(map[string]any)["1"].(map[string]any)
	if node["_meta"] == nil || node["is_changed"] == nil {
		t.Fatalf("node keys lost: %v", node)
	}
}

func TestPromptBodyNeverSendsNullExtraData(t *testing.T) {
	pr, berr := ParsePromptRequest([]byte(`{"prompt":{"1":{"class_type":"X","inputs":{}}},"extra_data":null}`))
	if berr != nil {
		t.Fatal(berr)
	}
	out, _ := pr.Body("p", "c")
	if bytes.Contains(out, []byte("extra_data")) {
		t.Fatalf("body %s", out)
	}
}

func TestParsePromptRequestErrors(t *testing.T) {
	for body, typ := range map[string]string{
		"{":                            "invalid_json",
		"[]":                           "invalid_json",
		"{}":                           "no_prompt",
		`{"prompt":[1]}`:               "invalid_prompt",
		`{"prompt":{"1":{}}}`:          "invalid_prompt",
		`{"prompt":{"1":5}}`:           "invalid_prompt",
		`{"prompt":{},"extra_data":7}`: "invalid_prompt",
	} {
		_, berr := ParsePromptRequest([]byte(body))
		if berr == nil || berr.Status != 400 || berr.Body.Error.Type != typ {
			t.Errorf("%s: %+v, want %s", body, berr, typ)
		}
	}
}

// Any /view query, read the way relay/view.go reads it: either refused, or
// a ref that Check accepts, that names the same file as the query did, and
// whose own query reads back to it.
func FuzzParseQuery(f *testing.F) {
	f.Add("filename=a.png&subfolder=x&type=output")
	f.Add("filename=..%2F..%2Fx&subfolder=..")
	f.Add("filename=a.png&subfolder=comfyume/0b0e/../1c1f&type=output&preview=webp;90")
	f.Add("filename=x.png [temp]&subfolder=a%5Cb&channel=a")
	f.Add("filename=%00&subfolder=a//b&type=input")
	f.Fuzz(func(t *testing.T, raw string) {
		v, st := ParseView(ParseQuery(raw))
		if st != 0 {
			return
		}
		if err := v.FileRef.Check(); err != nil {
			t.Fatalf("accepted %+v: %v", v.FileRef, err)
		}
		for _, name := range strings.Split(v.Subfolder+"/"+v.Filename, "/")[1:] {
			if name == ".." || name == "." || name == "" {
				t.Fatalf("escaping ref accepted: %+v", v.FileRef)
			}
		}
		back, st := ParseView(ParseQuery(v.FileRef.Query()))
		if st != 0 || back.FileRef != v.FileRef {
			t.Fatalf("%+v reads back as %+v (%d)", v.FileRef, back.FileRef, st)
		}
	})
}

// Any file value of a prompt: either refused, or a ref Check accepts that
// Annotated writes back to an equivalent value.
func FuzzParseAnnotated(f *testing.F) {
	for _, s := range []string{"cat.png", "clipspace/mask-1.png [input]", "comfyume/b/../../a/output/x.png [output]",
		"a//b.png", "a\\b.png", " x.png [temp] ", "sub/dir/", "/abs.png"} {
		f.Add(s, TypeInput)
	}
	f.Add("o.png", TypeOutput)
	f.Fuzz(func(t *testing.T, value, typ string) {
		if !ValidType(typ) {
			return
		}
		r, err := ParseAnnotated(value, typ)
		if err != nil {
			return
		}
		if err := r.Check(); err != nil {
			t.Fatalf("%q accepted as %+v: %v", value, r, err)
		}
		if strings.Contains("/"+r.Subfolder+"/", "/../") || strings.Contains(r.Filename, "/") {
			t.Fatalf("%q escapes: %+v", value, r)
		}
		back, err := ParseAnnotated(r.Annotated(), TypeInput)
		if err != nil || back != r {
			t.Fatalf("%q → %+v → %q → %+v %v", value, r, r.Annotated(), back, err)
		}
	})
}

func TestPeekType(t *testing.T) {
	for in, want := range map[string]string{
		`{"type":"progress","data":{}}`:  "progress",
		`{"type": "status", "data": {}}`: "status",
		`{"data":{},"type":"x"}`:         "",
		`{"type":"a\"b"}`:                "",
		`{"type":5}`:                     "",
	} {
		got, ok := PeekType([]byte(in))
		if got != want || ok != (want != "") {
			t.Errorf("%s: %q %v", in, got, ok)
		}
	}
}

// PeekType reads exactly the type a frame starts with, whether it is one
// of the frequent types it returns without a copy or any other.
func FuzzPeekType(f *testing.F) {
	for _, s := range []string{
		`{"type": "progress", "data": {"value": 1, "max": 20}}`,
		`{"type":"progress_state","data":{}}`,
		`{"type": "executing", "data": {"node": null}}`,
		`{"type": "status", "data": {}}`,
		`{"type": "progress_x", "data": {}}`,
		`{"type": "progres", "data": {}}`,
		`{"type":"a\"b"}`,
		`{"type":5}`,
		`{"type": ""}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		typ, ok := PeekType(b)
		if !ok {
			if typ != "" {
				t.Fatalf("%q: not ok but type %q", b, typ)
			}
			return
		}
		rest := bytes.TrimLeft(bytes.TrimPrefix(b, []byte(`{"type":`)), " ")
		if want := `"` + typ + `"`; !bytes.HasPrefix(rest, []byte(want)) || strings.ContainsAny(typ, `"\`) {
			t.Fatalf("%q: type %q", b, typ)
		}
	})
}

// The binary frames an upstream sends (previews of type 1 and 4, progress
// text of type 3 in both layouts) never make the parsers panic, and what
// they read encodes back to a frame that reads the same.
func FuzzBinaryFrames(f *testing.F) {
	pid := "0b5c8f4e-2f4a-4c57-9d7e-1f2a3b4c5d6e"
	f.Add(Preview{ImageType: "image/jpeg", Image: []byte{0xff, 0xd8, 0xff}}.EncodeType1())
	f.Add(Preview{ImageType: "image/png", Image: []byte("\x89PNG")}.EncodeType1())
	f.Add(Preview{ImageType: "image/png", Image: []byte("\x89PNG")}.EncodeType4(PreviewMetadata{NodeID: "3", PromptID: pid}))
	f.Add(TextFrame{NodeID: "7", Text: []byte("hello")}.Encode(false))
	f.Add(TextFrame{PromptID: pid, NodeID: "7", Text: []byte("hello")}.Encode(true))
	f.Add([]byte{0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff, '{', '}'})
	f.Add([]byte{0, 0, 0, 3})
	f.Add([]byte{0, 0, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		if p, err := ParsePreview(b); err == nil {
			if len(b) < 8 || len(p.Image) > len(b)-8 {
				t.Fatalf("%q: image of %d bytes from a frame of %d", b, len(p.Image), len(b))
			}
			var again []byte
			if p.Metadata == nil {
				again = p.EncodeType1()
			} else {
				again = p.EncodeType4(*p.Metadata)
			}
			q, err := ParsePreview(again)
			if err != nil || q.ImageType != p.ImageType || !bytes.Equal(q.Image, p.Image) || (p.Metadata == nil) != (q.Metadata == nil) ||
				p.Metadata != nil && (q.Metadata.PromptID != p.Metadata.PromptID || q.Metadata.NodeID != p.Metadata.NodeID) {
				t.Fatalf("%q read as %+v, encoded as %q, read back as %+v (%v)", b, p, again, q, err)
			}
		}
		for _, withID := range []bool{false, true} {
			tf, err := ParseText(b, withID)
			if err != nil {
				continue
			}
			again := tf.Encode(withID)
			back, err := ParseText(again, withID)
			if err != nil || back.PromptID != tf.PromptID || back.NodeID != tf.NodeID || !bytes.Equal(back.Text, tf.Text) {
				t.Fatalf("%q (prompt id layout %v) read as %+v, encoded as %q, read back as %+v (%v)", b, withID, tf, again, back, err)
			}
			if len(again) != len(b) {
				t.Fatalf("%q re-encoded as %d bytes, was %d", b, len(again), len(b))
			}
		}
	})
}
