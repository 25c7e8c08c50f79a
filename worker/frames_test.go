package worker

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/comfyume/comfyume/comfy"
)

func TestFramesRoundTrip(t *testing.T) {
	big := bytes.Repeat([]byte("0123456789abcdef"), 20000) // > smallFrame: header and parts written apart
	var buf bytes.Buffer
	fw := NewWriter(&buf)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(fw.WriteJSON(KindJob, JobSpec{PromptID: "p", Prompt: []byte(`{"1":{}}`), Files: []FileSpec{{ID: 7, FileRef: comfy.FileRef{Filename: "a.png", Type: "input"}}}}))
	must(fw.WriteID(KindFileChunk, 7, []byte("abc")))
	must(fw.WriteID(KindFileChunk, 7, big))
	must(fw.WriteID(KindFileEnd, 7, nil))
	must(fw.Write(KindStart))
	must(fw.Write(KindBinary, []byte{0, 0, 0, 1}, []byte("jpeg")))

	fr := NewReader(&buf)
	next := func(want Kind) []byte {
		t.Helper()
		k, p, err := fr.Next()
		if err != nil || k != want {
			t.Fatalf("got %s %v, want %s", k, err, want)
		}
		return p
	}
	if p := next(KindJob); !strings.Contains(string(p), `"files":[{"id":7,"filename":"a.png","subfolder":"","type":"input"}]`) {
		t.Fatalf("job payload %s", p)
	}
	for _, want := range [][]byte{[]byte("abc"), big} {
		id, data, err := SplitID(next(KindFileChunk))
		if err != nil || id != 7 || !bytes.Equal(data, want) {
			t.Fatalf("chunk id %d len %d err %v", id, len(data), err)
		}
	}
	if id, data, _ := SplitID(next(KindFileEnd)); id != 7 || len(data) != 0 {
		t.Fatalf("end %d %q", id, data)
	}
	if p := next(KindStart); len(p) != 0 {
		t.Fatalf("start payload %q", p)
	}
	if p := next(KindBinary); string(p) != "\x00\x00\x00\x01jpeg" {
		t.Fatalf("binary %q", p)
	}
	if _, _, err := fr.Next(); err != io.EOF {
		t.Fatalf("end of stream: %v, want io.EOF", err)
	}
}

func TestFramesTruncated(t *testing.T) {
	var buf bytes.Buffer
	_ = NewWriter(&buf).Write(KindEvent, []byte(`{"type":"x","data":{}}`))
	full := buf.Bytes()
	for cut := 1; cut < len(full); cut++ {
		_, _, err := NewReader(bytes.NewReader(full[:cut])).Next()
		if err != io.ErrUnexpectedEOF {
			t.Fatalf("cut at %d: %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
	// A header that promises a lot over a short stream fails without
	// allocating the promised size.
	hdr := []byte{byte(KindOutputChunk), 0, 0, 0, 0}
	binary.BigEndian.PutUint32(hdr[1:], MaxPayload)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, _, err := NewReader(bytes.NewReader(append(hdr, 1, 2, 3))).Next(); err != io.ErrUnexpectedEOF {
		t.Fatalf("short payload: %v", err)
	}
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > 4<<20 {
		t.Fatalf("a truncated %d-byte frame allocated %d bytes", MaxPayload, d)
	}
}

func TestFramesTooLarge(t *testing.T) {
	hdr := []byte{byte(KindBinary), 0xff, 0xff, 0xff, 0xff}
	_, _, err := NewReader(bytes.NewReader(hdr)).Next()
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("oversized length: %v", err)
	}
	r := NewReader(bytes.NewReader([]byte{byte(KindEvent), 0, 0, 0, 11, 'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'}))
	r.Max = 10
	if _, _, err := r.Next(); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("over Reader.Max: %v", err)
	}
	w := NewWriter(io.Discard)
	w.Max = 10
	if err := w.Write(KindEvent, []byte("hello"), []byte(" world")); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("writer over Max: %v", err)
	}
	if _, _, err := SplitID([]byte{1, 2}); err == nil {
		t.Fatal("SplitID of a short payload")
	}
}

// The prompt id inside type-4 metadata is rewritten; the image is kept.
func TestMapPreviewID(t *testing.T) {
	j := &job{localID: "local-id", spec: JobSpec{PromptID: "gateway-prompt-id"}}
	img := []byte("\xff\xd8jpeg")
	frame := comfy.Preview{ImageType: "image/jpeg", Image: img}.EncodeType4(comfy.PreviewMetadata{NodeID: "2", PromptID: "local-id", DisplayNodeID: "2", RealNodeID: "2"})
	p, err := comfy.ParsePreview(j.mapPreviewID(frame))
	if err != nil || p.Metadata.PromptID != "gateway-prompt-id" || p.Metadata.NodeID != "2" || !bytes.Equal(p.Image, img) {
		t.Fatalf("%v %+v", err, p)
	}
	txt := j.mapID([]byte(`{"type":"executing","data":{"node":"1","prompt_id":"local-id"}}`))
	if string(txt) != `{"type":"executing","data":{"node":"1","prompt_id":"gateway-prompt-id"}}` {
		t.Fatalf("%s", txt)
	}
}
