package relay

import (
	"bytes"
	"io"
	"net"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfy"
)

// A writer's batch is the same frames, byte for byte, as writing each one
// alone, in few buffers: the small frames between two large payloads lie
// back to back in one buffer (a writev costs the kernel per buffer), and
// only payloads over copyFrame, or past the batch's copy bound, go out
// from where they are. The input drives a batch: each pair of bytes is a
// frame's kind and size.
func FuzzWriteBatch(f *testing.F) {
	f.Add([]byte{0, 10, 0, 200, 1, 3, 2, 90, 3, 255, 0, 1})
	f.Add(bytes.Repeat([]byte{0, 180}, 200))      // progress only: past the copy bound
	f.Add(bytes.Repeat([]byte{2, 255, 0, 4}, 30)) // previews between events
	f.Add([]byte{4, 0, 0, 0, 5, 7, 1, 255})
	f.Add(append(bytes.Repeat([]byte{200, 200}, 32), 0)) // small previews, copied, in a new scratch
	reused := scratchPool.Get().(*writeScratch)
	f.Fuzz(func(t *testing.T, in []byte) {
		// A writer's scratch as the pool hands it: used before (sized by
		// earlier batches), or new (sized by build for this batch alone).
		sc := reused
		if len(in)%4 == 1 {
			sc = &writeScratch{run: -1}
		}
		defer sc.reset()
		if len(in) > 2*maxBatchFrames {
			in = in[:2*maxBatchFrames]
		}
		var want bytes.Buffer
		batch := sc.batch[:0]
		for i := 0; i+1 < len(in); i += 2 {
			kind, size := in[i]%6, int(in[i+1])
			var q queued
			switch kind {
			case 0: // a progress-like text frame
				q.f.text = bytes.Repeat([]byte{'a' + byte(i%26)}, size+1)
			case 1: // a large text frame
				q.f.text = bytes.Repeat([]byte{'t'}, copyFrame+1+size)
			case 2, 3: // a preview, with and without metadata for the browser (small and large)
				q.f.preview = previewOf("p", "9", size*10, i)
				if kind == 3 {
					q.f.preview.Metadata = nil
				}
			case 4: // a binary frame
				q.f.binary = bytes.Repeat([]byte{byte(i)}, size*20)
			case 5: // a control frame, written as is
				q.raw = closeFrame(websocket.CloseNormalClosure, string(bytes.Repeat([]byte{'r'}, size%100)))
			}
			batch = append(batch, q)
			want.Write(alone(t, &q))
		}
		// Where each frame's payload lies: a buffer that starts there went
		// by reference.
		payloads := map[*byte]int{}
		small := 0
		for i := range batch {
			p := batch[i].raw
			switch q := &batch[i]; {
			case q.f.text != nil:
				p = q.f.text
			case q.f.binary != nil:
				p = q.f.binary
			case q.f.preview != nil:
				p = q.f.preview.Image
			}
			if len(p) > 0 {
				payloads[&p[0]] = len(p)
			}
			if len(p) <= copyFrame {
				small += maxHeader + 600 + len(p) // (600: a preview's head, at most)
			}
		}
		sc.build(batch, true)
		var got bytes.Buffer
		refs := 0
		for _, b := range sc.bufs {
			got.Write(b)
			if n, ok := payloads[&b[0]]; ok && n == len(b) {
				refs++
				if n <= copyFrame && small <= maxCopied {
					t.Fatalf("a payload of %d bytes went by reference, with the batch's copies under their bound", n)
				}
			}
		}
		if !bytes.Equal(got.Bytes(), want.Bytes()) {
			t.Fatalf("the batch's %d bytes differ from its frames written alone (%d bytes)", got.Len(), want.Len())
		}
		if n := len(batch); n > 0 && len(sc.bufs) > 1+2*refs {
			t.Fatalf("%d frames (%d payloads by reference) went out as %d buffers; want at most %d", n, refs, len(sc.bufs), 1+2*refs)
		}
	})
}

// alone is q as one frame written by itself: its header and payload, or
// its bytes as they are.
func alone(t *testing.T, q *queued) []byte {
	t.Helper()
	if q.raw != nil {
		return q.raw
	}
	op, p := websocket.BinaryMessage, q.f.binary
	switch {
	case q.f.text != nil:
		op, p = websocket.TextMessage, q.f.text
	case q.f.preview != nil:
		if q.f.preview.Metadata != nil {
			p = q.f.preview.AppendType4Head(nil, *q.f.preview.Metadata)
		} else {
			p = q.f.preview.AppendType1Head(nil)
		}
		p = append(p, q.f.preview.Image...)
		if _, err := comfy.ParsePreview(p); err != nil {
			t.Fatal(err)
		}
	}
	return append(appendHeader(nil, op, len(p)), p...)
}

// What a browser reads of a batch written to its connection is the
// frames in order, whatever the write was made of.
func TestBatchReadsAsItsFrames(t *testing.T) {
	server, browser := net.Pipe()
	defer server.Close()
	defer browser.Close()
	s := newSocket(0)
	s.out = server
	s.previewMeta = true
	frames := make(chan wireFrame, 64)
	go readWire(browser, frames)
	s.mu.Lock()
	for i := range 40 {
		q := queued{f: frame{text: progressText("p", "3", i)}}
		if i%10 == 9 {
			q = queued{f: frame{preview: previewOf("p", "3", 3000, i)}}
		}
		s.enqueueLocked(&q, false)
	}
	s.writing = true
	s.mu.Unlock()
	go s.writeLoop(nil, nil, false, false, nil)
	for i := range 40 {
		fr := <-frames
		switch {
		case i%10 == 9:
			p, err := comfy.ParsePreview(fr.payload)
			if err != nil || fr.op != websocket.BinaryMessage || len(p.Image) != 3000 || p.Image[0] != byte(i) {
				t.Fatalf("frame %d: not its preview (op %d, err %v)", i, fr.op, err)
			}
		case fr.op != websocket.TextMessage || !bytes.Equal(fr.payload, progressText("p", "3", i)):
			t.Fatalf("frame %d: %q", i, fr.payload)
		}
	}
	_ = io.Discard
}
