package worker

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"testing"

	"github.com/comfyume/comfyume/comfy"
)

// seedStream is a well-formed worker answer: accepted, an event, a
// preview, one output in two chunks, executed, done.
func seedStream() []byte {
	var buf bytes.Buffer
	fw := NewWriter(&buf)
	_ = fw.WriteJSON(KindAccepted, AcceptedInfo{PromptID: "p", Number: 1})
	_ = fw.Write(KindHeartbeat)
	_ = fw.Write(KindEvent, []byte(`{"type":"executing","data":{"node":"1","prompt_id":"p"}}`))
	_ = fw.Write(KindBinary, []byte{0, 0, 0, 1, 0, 0, 0, 1}, []byte("jpeg"))
	_ = fw.WriteJSON(KindOutputBegin, OutputInfo{ID: 1, FileRef: comfy.FileRef{Filename: "a.png", Type: "output"}, ContentType: "image/png", Size: 6})
	_ = fw.WriteID(KindOutputChunk, 1, []byte("abc"))
	_ = fw.WriteID(KindOutputChunk, 1, []byte("def"))
	_ = fw.WriteID(KindOutputEnd, 1, nil)
	_ = fw.Write(KindEvent, []byte(`{"type":"executed","data":{"node":"1","prompt_id":"p","output":{"images":[{"filename":"a.png","subfolder":"","type":"output"}]}}}`))
	_ = fw.Write(KindDone)
	return buf.Bytes()
}

// seedJobBody is a well-formed request body: job, one file, start.
func seedJobBody() []byte {
	var buf bytes.Buffer
	fw := NewWriter(&buf)
	_ = fw.WriteJSON(KindJob, JobSpec{PromptID: "p", Prompt: []byte(`{"1":{}}`), Files: []FileSpec{{ID: 7, FileRef: comfy.FileRef{Filename: "a.png", Type: "input"}}}})
	_ = fw.WriteID(KindFileChunk, 7, []byte("abc"))
	_ = fw.WriteID(KindFileEnd, 7, nil)
	_ = fw.Write(KindStart)
	return buf.Bytes()
}

// FuzzFrameReader: whatever a peer sends, the reader returns frames no
// larger than its limit and than what arrived, and the frames it returns
// are exactly the bytes it consumed.
func FuzzFrameReader(f *testing.F) {
	f.Add(seedStream(), uint16(1024))
	f.Add(seedJobBody(), uint16(8))
	f.Add([]byte{0x12, 0xff, 0xff, 0xff, 0xff, 'x'}, uint16(100)) // a lying length
	f.Add([]byte{0x12, 0, 0, 0, 5, 'a', 'b'}, uint16(100))        // cut short
	f.Add([]byte{}, uint16(0))
	f.Fuzz(func(t *testing.T, data []byte, max uint16) {
		fr := NewReader(bytes.NewReader(data))
		fr.Max = int(max) + 1
		var again bytes.Buffer
		fw := NewWriter(&again)
		fw.Max = fr.Max
		for {
			k, p, err := fr.Next()
			if err != nil {
				if err == io.EOF && !bytes.Equal(again.Bytes(), data) {
					t.Fatalf("clean end, but the frames read are not the stream")
				}
				break
			}
			if len(p) > fr.Max || len(p) > len(data) {
				t.Fatalf("payload of %d bytes (max %d, stream %d)", len(p), fr.Max, len(data))
			}
			if err := fw.Write(k, p); err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(data, again.Bytes()) {
				t.Fatalf("frame %s does not re-encode to the bytes read", k)
			}
		}
	})
}

// fuzzHandler records what the client delivers and reads outputs whole.
type fuzzHandler struct {
	read, announced int
}

func (h *fuzzHandler) Accepted(string, float64) {}
func (h *fuzzHandler) Event([]byte, comfy.Head) {}
func (h *fuzzHandler) Binary([]byte)            {}
func (h *fuzzHandler) Output(_ comfy.FileRef, _ string, body io.Reader) error {
	h.announced++
	n, err := io.Copy(io.Discard, body)
	h.read += int(n)
	if h.announced%2 == 0 {
		return err // every other output: leave the rest unread on error
	}
	return nil
}

// FuzzClientStream runs the gateway side of a job stream on whatever a
// worker (or anything pretending to be one) answers: it never panics nor
// hangs, and never delivers more output bytes than the stream held.
func FuzzClientStream(f *testing.F) {
	f.Add(seedStream())
	s := seedStream()
	f.Add(s[:len(s)/2])
	var buf bytes.Buffer
	fw := NewWriter(&buf)
	_ = fw.WriteJSON(KindAccepted, AcceptedInfo{})
	_ = fw.WriteJSON(KindOutputBegin, OutputInfo{ID: 2, Size: 1 << 62})
	_ = fw.WriteID(KindOutputChunk, 3, []byte("other id"))
	f.Add(buf.Bytes())
	buf.Reset()
	_ = fw.WriteJSON(KindRejected, RejectedInfo{Status: 400, Body: []byte(`"not json"`)})
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		c := &Client{IdleTimeout: -1}
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {ContentType}}, Body: io.NopCloser(bytes.NewReader(data))}
		h := &fuzzHandler{}
		_ = c.consume(ctx, cancel, resp, Job{PromptID: "p", Prompt: []byte(`{}`)}, h, false)
		if h.read > len(data) {
			t.Fatalf("%d output bytes from a %d-byte stream", h.read, len(data))
		}
	})
}

// FuzzJobFrames reads a request body's job frame as the worker does: a
// bad one is refused, never a panic.
func FuzzJobFrames(f *testing.F) {
	f.Add(seedJobBody())
	f.Add([]byte{0x01, 0, 0, 0, 2, '{', '}'})
	var buf bytes.Buffer
	_ = NewWriter(&buf).Write(KindJob, []byte(`{"prompt":{"1":{}},"files":[{"id":1,"filename":"a"},{"id":1,"filename":"b"}]}`))
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := NewReader(bytes.NewReader(data))
		k, p, err := fr.Next()
		if err != nil || k != KindJob {
			return
		}
		j := &job{}
		if err := j.parseSpec(p); err != nil {
			return
		}
		if j.spec.PromptID == "" || len(bytes.TrimSpace(j.spec.Prompt)) == 0 {
			t.Fatalf("accepted a job without id or prompt: %s", p)
		}
		seen := map[uint32]bool{}
		for _, fs := range j.spec.Files {
			if seen[fs.ID] || fs.Filename == "" {
				t.Fatalf("accepted files %v", j.spec.Files)
			}
			seen[fs.ID] = true
		}
	})
}
