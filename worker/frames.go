package worker

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/comfyume/comfyume/comfy"
)

// ContentType marks a frame stream: the gateway's request body and the
// worker's response body both carry it.
const ContentType = "application/x-comfyume-job"

// Kind is the first byte of a frame.
//
// A frame is [1 byte kind][4 bytes big-endian payload length][payload].
// Payload layouts, per kind:
//
//	kind  name          direction         payload
//	0x01  job           gateway → worker  JSON JobSpec; the first frame of the request body
//	0x02  file chunk    gateway → worker  [u32 file id][bytes]
//	0x03  file end      gateway → worker  [u32 file id]
//	0x04  start         gateway → worker  empty; every file was sent; the last frame of the body
//	0x10  accepted      worker → gateway  JSON AcceptedInfo {"prompt_id","number","node_errors"}
//	0x11  rejected      worker → gateway  JSON RejectedInfo {"status","body"}; ComfyUI's answer verbatim; done follows
//	0x12  event         worker → gateway  a ComfyUI WebSocket text message, JSON, prompt_id mapped to the gateway's
//	0x13  binary        worker → gateway  a ComfyUI binary WebSocket frame (preview type 1/4, text type 3), verbatim but for type-4 prompt ids
//	0x14  output begin  worker → gateway  JSON OutputInfo {"id","filename","subfolder","type","content_type","size"}
//	0x15  output chunk  worker → gateway  [u32 output id][bytes]
//	0x16  output end    worker → gateway  [u32 output id][optional UTF-8 error: the file was cut short]
//	0x17  error         worker → gateway  JSON ErrorInfo {"message"}; ends the stream (no done follows)
//	0x18  heartbeat     worker → gateway  empty; sent while idle so that proxies keep the stream open
//	0x19  done          worker → gateway  empty; the job ended (after its terminal event + executing{node:null})
//
// The output frames of one file are never interleaved with another file's
// or with events: begin, chunks, end come in a row (heartbeats aside),
// and all files named in an executed event come before that event.
type Kind byte

// Frame kinds; see Kind for their payloads.
const (
	KindJob       Kind = 0x01
	KindFileChunk Kind = 0x02
	KindFileEnd   Kind = 0x03
	KindStart     Kind = 0x04

	KindAccepted    Kind = 0x10
	KindRejected    Kind = 0x11
	KindEvent       Kind = 0x12
	KindBinary      Kind = 0x13
	KindOutputBegin Kind = 0x14
	KindOutputChunk Kind = 0x15
	KindOutputEnd   Kind = 0x16
	KindError       Kind = 0x17
	KindHeartbeat   Kind = 0x18
	KindDone        Kind = 0x19
)

var kindNames = map[Kind]string{
	KindJob: "job", KindFileChunk: "file chunk", KindFileEnd: "file end", KindStart: "start",
	KindAccepted: "accepted", KindRejected: "rejected", KindEvent: "event", KindBinary: "binary",
	KindOutputBegin: "output begin", KindOutputChunk: "output chunk", KindOutputEnd: "output end",
	KindError: "error", KindHeartbeat: "heartbeat", KindDone: "done",
}

func (k Kind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return fmt.Sprintf("kind(0x%02x)", byte(k))
}

const (
	// HeaderSize is the size of a frame header.
	HeaderSize = 5
	// MaxPayload is the default largest payload a Reader accepts and a
	// Writer sends. Files travel in chunks far below it; it is this large
	// because a binary WebSocket frame (a full-size PNG from
	// SaveImageWebsocket, say) must fit in one frame.
	MaxPayload = 32 << 20
	// DefaultChunkSize is the payload size of file and output chunks.
	DefaultChunkSize = 1 << 20
)

// ErrFrameTooLarge is returned for a frame whose payload exceeds the limit.
var ErrFrameTooLarge = errors.New("worker: frame payload too large")

// Writer writes frames to an underlying stream. It is not safe for
// concurrent use.
type Writer struct {
	w io.Writer
	// Max is the largest payload Write accepts (MaxPayload if 0).
	Max int
	buf []byte
}

// NewWriter returns a frame writer on w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// smallFrame is the size up to which a frame is assembled in one buffer
// and written with a single Write.
const smallFrame = 64 << 10

// Write sends one frame whose payload is the concatenation of parts.
func (fw *Writer) Write(k Kind, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	max := fw.Max
	if max <= 0 {
		max = MaxPayload
	}
	if n > max || uint64(n) > uint64(^uint32(0)) {
		return fmt.Errorf("%w: %s of %d bytes (max %d)", ErrFrameTooLarge, k, n, max)
	}
	hdr := [HeaderSize]byte{byte(k)}
	binary.BigEndian.PutUint32(hdr[1:], uint32(n))
	if n <= smallFrame {
		fw.buf = append(fw.buf[:0], hdr[:]...)
		for _, p := range parts {
			fw.buf = append(fw.buf, p...)
		}
		_, err := fw.w.Write(fw.buf)
		return err
	}
	if _, err := fw.w.Write(hdr[:]); err != nil {
		return err
	}
	for _, p := range parts {
		if len(p) == 0 {
			continue
		}
		if _, err := fw.w.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// WriteJSON sends a frame whose payload is v as JSON.
func (fw *Writer) WriteJSON(k Kind, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return fw.Write(k, b)
}

// WriteID sends a frame whose payload is [u32 id][data] (file/output
// chunks and ends).
func (fw *Writer) WriteID(k Kind, id uint32, data []byte) error {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], id)
	return fw.Write(k, b[:], data)
}

// Reader reads frames from an underlying stream.
type Reader struct {
	r io.Reader
	// Max is the largest payload accepted (MaxPayload if 0).
	Max int
	// SkipOver, if set, gives for a kind of frame a size over which such a
	// frame is skipped — its payload read and discarded, never buffered —
	// instead of ending the stream with ErrFrameTooLarge (0: none). Each
	// skipped frame is counted in Skipped.
	SkipOver func(k Kind) int
	Skipped  int
}

// NewReader returns a frame reader on r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// Next reads the next frame. The payload is a new slice the caller may
// keep. At the end of a stream that ends on a frame boundary it returns
// io.EOF; a stream cut inside a frame gives io.ErrUnexpectedEOF; a length
// over the limit gives ErrFrameTooLarge (nothing is allocated for it).
func (fr *Reader) Next() (Kind, []byte, error) {
	var hdr [HeaderSize]byte
	if _, err := io.ReadFull(fr.r, hdr[:]); err != nil {
		return 0, nil, err // io.EOF at a boundary, io.ErrUnexpectedEOF inside a header
	}
	k := Kind(hdr[0])
	n := binary.BigEndian.Uint32(hdr[1:])
	if fr.SkipOver != nil {
		if skip := fr.SkipOver(k); skip > 0 && uint64(n) > uint64(skip) {
			if _, err := io.CopyN(io.Discard, fr.r, int64(n)); err != nil {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return k, nil, err
			}
			fr.Skipped++
			return fr.Next()
		}
	}
	max := fr.Max
	if max <= 0 {
		max = MaxPayload
	}
	if uint64(n) > uint64(max) {
		return k, nil, fmt.Errorf("%w: %s declares %d bytes (max %d)", ErrFrameTooLarge, k, n, max)
	}
	if n == 0 {
		return k, []byte{}, nil
	}
	// Grow the buffer with the data that actually arrives, so that a
	// truncated stream declaring a large frame costs little memory.
	size := int(n)
	buf := make([]byte, 0, min(size, 1<<20))
	for len(buf) < size {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(size-len(buf), cap(buf)))
		}
		end := min(cap(buf), size)
		m, err := io.ReadFull(fr.r, buf[len(buf):end])
		buf = buf[:len(buf)+m]
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return k, nil, err
		}
	}
	return k, buf, nil
}

// SplitID splits a [u32 id][bytes] payload.
func SplitID(p []byte) (uint32, []byte, error) {
	if len(p) < 4 {
		return 0, nil, fmt.Errorf("worker: payload of %d bytes has no id", len(p))
	}
	return binary.BigEndian.Uint32(p), p[4:], nil
}

// JobSpec is the payload of the job frame.
type JobSpec struct {
	// PromptID is the gateway's id; every event the worker sends carries it.
	PromptID string `json:"prompt_id"`
	// Prompt is the API-format graph.
	Prompt json.RawMessage `json:"prompt"`
	// ExtraData is POST /prompt's extra_data (may be absent).
	ExtraData json.RawMessage `json:"extra_data,omitempty"`
	// PartialExecutionTargets is POST /prompt's partial_execution_targets
	// (may be absent).
	PartialExecutionTargets json.RawMessage `json:"partial_execution_targets,omitempty"`
	// Files are the input files that follow in file chunk/end frames.
	Files []FileSpec `json:"files"`
}

// FileSpec announces one input file of a job: it is uploaded to the
// worker's ComfyUI under this name, subfolder and type.
type FileSpec struct {
	ID uint32 `json:"id"`
	comfy.FileRef
}

// AcceptedInfo is the payload of the accepted frame: ComfyUI's answer to
// POST /prompt, with the gateway's prompt_id.
type AcceptedInfo struct {
	PromptID   string          `json:"prompt_id"`
	Number     float64         `json:"number"`
	NodeErrors json.RawMessage `json:"node_errors,omitempty"`
}

// RejectedInfo is the payload of the rejected frame: the status and body
// ComfyUI answered POST /prompt with. Body is the body verbatim when it is
// JSON, else a JSON string holding it.
type RejectedInfo struct {
	Status int             `json:"status"`
	Body   json.RawMessage `json:"body"`
}

// OutputInfo is the payload of the output begin frame.
type OutputInfo struct {
	ID uint32 `json:"id"`
	comfy.FileRef
	ContentType string `json:"content_type"`
	// Size is the file size if ComfyUI announced it, else -1.
	Size int64 `json:"size"`
}

// ErrorInfo is the payload of the error frame (and of the worker's JSON
// error responses).
type ErrorInfo struct {
	Message string `json:"message"`
}
