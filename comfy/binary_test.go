package comfy

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"
)

// A type-4 preview's metadata reads as encoding/json reads it, keys as
// ComfyUI sends them (exact, not folded): the members of PreviewMetadata's
// names must be strings or null, others anything, the last of a name
// wins, and anything but one object is refused. What AppendType4Head
// writes reads back as the metadata it was given.
func FuzzPreviewMetadata(f *testing.F) {
	f.Add([]byte(`{"node_id": "3", "prompt_id": "p-1", "display_node_id": "3", "parent_node_id": null, "real_node_id": "3", "image_type": "image/jpeg"}`), "3", "p")
	f.Add([]byte(`{"node_id":"9","parent_node_id":"7","x":[1,{"y":null}],"node_id":"\u0031\n"}`), "a\"b", "\x00\xff")
	f.Add([]byte(` {"\u006eode_id":"1","image_type":null} `), "", "é")
	f.Add([]byte(`{"node_id":3}`), "", "")
	f.Add([]byte(`{"node_id":"1"}{}`), "", "")
	f.Fuzz(func(t *testing.T, b []byte, node, prompt string) {
		got, ok := parsePreviewMetadata(b)
		want, wantOK, skip := referenceMetadata(b)
		if !skip && (ok != wantOK || ok && !sameMetadata(got, want)) {
			t.Fatalf("%q: read %+v %v, encoding/json reads %+v %v", b, got, ok, want, wantOK)
		}

		parent := node + prompt
		md := PreviewMetadata{NodeID: node, PromptID: prompt, DisplayNodeID: prompt, ParentNodeID: &parent, RealNodeID: node}
		head := Preview{ImageType: "image/png"}.AppendType4Head([]byte("x"), md)
		frame := append(head[1:], "IMAGE"...)
		p, err := ParsePreview(frame)
		if err != nil || string(p.Image) != "IMAGE" || p.ImageType != "image/png" {
			t.Fatalf("the frame of %+v does not read back: %v", md, err)
		}
		n := binary.BigEndian.Uint32(frame[4:8])
		if !json.Valid(frame[8 : 8+n]) {
			t.Fatalf("metadata written is not JSON: %q", frame[8:8+n])
		}
		md.ImageType = "image/png"
		if want, _ := json.Marshal(md); string(frame[8:8+n]) != string(want) {
			t.Fatalf("metadata written %q, json.Marshal writes %q", frame[8:8+n], want)
		}
		if utf8.ValidString(node) && utf8.ValidString(prompt) && !sameMetadata(*p.Metadata, md) {
			t.Fatalf("wrote %+v, read back %+v", md, *p.Metadata)
		}
	})
}

// referenceMetadata is what encoding/json reads of b; ok is false for b
// it refuses, and skip true when b has a key encoding/json takes for a
// member's name by folding case, which ComfyUI never sends.
func referenceMetadata(b []byte) (md PreviewMetadata, ok, skip bool) {
	var m map[string]json.RawMessage
	_ = json.Unmarshal(b, &m)
	for k := range m {
		for _, name := range []string{"node_id", "prompt_id", "display_node_id", "parent_node_id", "real_node_id", "image_type"} {
			if k != name && strings.EqualFold(k, name) {
				return md, false, true // (also when encoding/json refuses its value)
			}
		}
	}
	if !bytes.HasPrefix(bytes.TrimLeft(b, " \t\r\n"), []byte("{")) || json.Unmarshal(b, &md) != nil {
		return PreviewMetadata{}, false, false
	}
	return md, true, false
}

func sameMetadata(a, b PreviewMetadata) bool {
	if (a.ParentNodeID == nil) != (b.ParentNodeID == nil) || a.ParentNodeID != nil && *a.ParentNodeID != *b.ParentNodeID {
		return false
	}
	a.ParentNodeID, b.ParentNodeID = nil, nil
	return a == b
}

// BenchmarkPreviewType4 reads a type-4 preview frame as the GPU stream's
// reader does and writes its head for a browser, as each socket does.
func BenchmarkPreviewType4(b *testing.B) {
	md := PreviewMetadata{NodeID: "3", PromptID: "2f1c7a52-6d0e-4f43-9c55-0d3f1b6f0b2e", DisplayNodeID: "3", RealNodeID: "3", ImageType: "image/jpeg"}
	frame := Preview{ImageType: "image/jpeg", Image: make([]byte, 64<<10)}.EncodeType4(md)
	head := make([]byte, 0, 512)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		p, err := ParsePreview(frame)
		if err != nil {
			b.Fatal(err)
		}
		head = p.AppendType4Head(head[:0], *p.Metadata)
	}
}
