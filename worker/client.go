package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/comfyume/comfyume/comfy"
)

// Job is one prompt with its input files, as the gateway sends it.
type Job struct {
	// PromptID is the gateway's prompt id (a lowercase UUID); every event
	// delivered to the Handler carries it, whatever id the worker's
	// ComfyUI used.
	PromptID string
	// Prompt is the API-format graph.
	Prompt json.RawMessage
	// ExtraData is POST /prompt's extra_data (nil for none).
	ExtraData json.RawMessage
	// PartialExecutionTargets is POST /prompt's partial_execution_targets
	// (nil for none).
	PartialExecutionTargets json.RawMessage
	// Files are uploaded to the worker's ComfyUI before the prompt is
	// queued, under their Ref's name, subfolder and type.
	Files []InputFile
}

// InputFile is one input of a job. Open is called once, while the
// request body is being sent; the file is streamed, never held whole.
type InputFile struct {
	Ref  comfy.FileRef
	Open func() (io.ReadCloser, error)
}

// Handler receives what a job produces, in the order ComfyUI produced it.
// Its methods are called from the goroutine that called Run, one at a
// time.
type Handler interface {
	// Accepted: ComfyUI queued the prompt (number is its queue number).
	Accepted(promptID string, number float64)
	// Event is a ComfyUI WebSocket text message of the job (status and
	// other prompts' messages are filtered out), with the job's prompt id:
	// the JSON frame as the worker sent it and what comfy.ScanEvent read
	// of it. The handler may keep the frame.
	Event(frame []byte, head comfy.Head)
	// Binary is a binary WebSocket frame of the job (previews of type 1
	// and 4, progress text of type 3). The handler may keep it.
	Binary(frame []byte)
	// Output streams one output file. It is called before the executed
	// event that names the file is delivered. body is valid only during
	// the call; it returns an error if the file was cut short. Returning
	// an error aborts the job (Run returns it, the worker interrupts the
	// prompt). body also has a Size() int64 method (-1 when unknown).
	Output(ref comfy.FileRef, contentType string, body io.Reader) error
}

// DefaultClientIdle is the default Client.IdleTimeout.
const DefaultClientIdle = 2 * time.Minute

// Client sends jobs to a worker (or to a load balancer in front of many).
type Client struct {
	// URL is where the worker's handler is mounted.
	URL string
	// Header is added to every request (e.g. Authorization).
	Header http.Header
	// HTTP is the client used (http.DefaultClient if nil). It must not
	// have a Timeout shorter than the longest job.
	HTTP *http.Client
	// IdleTimeout: once the job is accepted, Run fails when no frame
	// (heartbeats included) arrives for this long. 0 means
	// DefaultClientIdle, a negative value disables the check. Keep it well
	// above the worker's Options.Heartbeat.
	IdleTimeout time.Duration
	// Async, if set, sends jobs the request/response way of platforms
	// that only offer asynchronous HTTP (see AsyncOptions); nil streams
	// the response as it is produced.
	Async *AsyncOptions
	// MaxEventSize and MaxBinarySize, if > 0, bound the job's JSON events
	// and binary frames (previews): larger ones are skipped, reported to a
	// Handler that has an Oversized method, and the job goes on.
	MaxEventSize, MaxBinarySize int
}

// OversizedHandler is a Handler told of frames skipped over the Client's
// MaxEventSize or MaxBinarySize (the count so far).
type OversizedHandler interface {
	Oversized(skipped int)
}

// RejectedError is ComfyUI's refusal of the prompt (normally a 400 with
// node_errors). Body is ComfyUI's response body verbatim.
type RejectedError struct {
	Status int
	Body   []byte
}

func (e *RejectedError) Error() string {
	var b struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if json.Unmarshal(e.Body, &b) == nil && b.Error.Message != "" {
		return fmt.Sprintf("worker: ComfyUI rejected the prompt (%d %s): %s", e.Status, b.Error.Type, b.Error.Message)
	}
	return fmt.Sprintf("worker: ComfyUI rejected the prompt (%d): %s", e.Status, truncate(e.Body, 200))
}

// NotAcceptedError means the job never reached a ComfyUI: the worker could
// not be reached, was not ready, or a proxy answered 429/502/503/504. The
// caller may send the job again, elsewhere or later.
type NotAcceptedError struct {
	// Status is the HTTP status received, 0 if none.
	Status int
	Err    error
}

func (e *NotAcceptedError) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("worker: job not accepted (HTTP %d): %v", e.Status, e.Err)
	}
	return fmt.Sprintf("worker: job not accepted: %v", e.Err)
}

func (e *NotAcceptedError) Unwrap() error { return e.Err }

// WorkerError is a failure the worker reported: an error frame after the
// job was accepted (Status 0), or a refusal that retrying elsewhere will
// not cure (Status 400, 401, ...).
type WorkerError struct {
	Status  int
	Message string
}

func (e *WorkerError) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("worker: HTTP %d: %s", e.Status, e.Message)
	}
	return "worker: " + e.Message
}

// inputError is a failure to read one of the job's input files.
type inputError struct{ err error }

func (e *inputError) Error() string { return e.err.Error() }
func (e *inputError) Unwrap() error { return e.err }

var errIdle = errors.New("worker: no frame from the worker within the idle timeout")

// Run sends the job and streams everything to h until the job ends. It
// returns a *RejectedError when ComfyUI refused the prompt, a
// *NotAcceptedError when the job never reached ComfyUI (the caller may
// retry elsewhere), the context's error when ctx ended (the worker then
// interrupts the prompt), or another error when the stream broke after
// acceptance. An execution_error is not an error of Run: it arrives as an
// event and Run returns nil.
//
// With c.Async set, Run submits the job asynchronously and delivers what
// it produced once the platform has the whole response; see AsyncOptions.
func (c *Client) Run(ctx context.Context, job Job, h Handler) error {
	if len(job.Prompt) == 0 {
		return errors.New("worker: the job has no prompt")
	}
	spec := JobSpec{PromptID: job.PromptID, Prompt: job.Prompt, ExtraData: job.ExtraData,
		PartialExecutionTargets: job.PartialExecutionTargets, Files: make([]FileSpec, len(job.Files))}
	for i, f := range job.Files {
		if f.Open == nil || f.Ref.Filename == "" {
			return fmt.Errorf("worker: input file %d has no name or no Open", i)
		}
		spec.Files[i] = FileSpec{ID: uint32(i + 1), FileRef: f.Ref}
	}
	var sb strings.Builder
	enc := json.NewEncoder(&sb)
	enc.SetEscapeHTML(false)
	err := enc.Encode(spec)
	specJSON := []byte(strings.TrimSuffix(sb.String(), "\n"))
	if err != nil {
		return fmt.Errorf("worker: encoding the job: %w", err)
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	pr, pw := io.Pipe()
	bodyDone := make(chan error, 1)
	go func() {
		err := writeBody(pw, specJSON, job.Files)
		_ = pw.CloseWithError(err)
		bodyDone <- err
	}()
	var bodyOnce sync.Once
	var bodyResult error
	bodyErr := func() error {
		bodyOnce.Do(func() {
			_ = pr.CloseWithError(errAborted)
			bodyResult = <-bodyDone
		})
		return bodyResult
	}

	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL, pr)
	if err != nil {
		bodyErr()
		return fmt.Errorf("worker: %w", err)
	}
	for k, v := range c.Header {
		req.Header[k] = append([]string(nil), v...)
	}
	req.Header.Set("Content-Type", ContentType)
	req.Header.Set("Accept", ContentType)
	if c.Async != nil {
		req.Header.Set("Prefer", "respond-async")
	}
	hc := c.httpClient()
	submitted := time.Now()
	resp, err := hc.Do(req)
	if err != nil {
		berr := bodyErr()
		var ie *inputError
		switch {
		case errors.As(berr, &ie):
			return fmt.Errorf("worker: %w", ie)
		case ctx.Err() != nil:
			return context.Cause(ctx)
		}
		return &NotAcceptedError{Err: err}
	}
	defer resp.Body.Close()
	defer bodyErr()

	if c.Async != nil && resp.StatusCode == http.StatusAccepted {
		sub, err := c.submitted(resp)
		resp.Body.Close()
		if berr := bodyErr(); berr != nil {
			var ie *inputError
			if errors.As(berr, &ie) {
				return fmt.Errorf("worker: %w", ie)
			}
			return fmt.Errorf("worker: the platform answered 202 before the whole job was sent: %w", berr)
		}
		if err != nil {
			return err
		}
		result, err := c.await(ctx, sub, submitted)
		if err != nil {
			return err
		}
		defer result.Body.Close()
		return c.consume(ctx, cancel, result, job, h, true)
	}
	return c.consume(ctx, cancel, resp, job, h, false)
}

func (c *Client) httpClient() *http.Client {
	if c.HTTP != nil {
		return c.HTTP
	}
	return http.DefaultClient
}

// consume handles the worker's answer to a job: resp is the answer itself
// (streaming mode) or the platform's stored copy of it (fromResult, async
// mode), read after the job ran.
func (c *Client) consume(ctx context.Context, cancel context.CancelCauseFunc, resp *http.Response, job Job, h Handler, fromResult bool) error {
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		msg := strings.TrimSpace(string(b))
		var ei ErrorInfo
		if json.Unmarshal(b, &ei) == nil && ei.Message != "" {
			msg = ei.Message
		}
		switch resp.StatusCode {
		case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return &NotAcceptedError{Status: resp.StatusCode, Err: errors.New(string(truncate([]byte(msg), 500)))}
		}
		return &WorkerError{Status: resp.StatusCode, Message: msg}
	}
	if fromResult {
		// The stored response may have lost its Content-Type; the frames
		// themselves are checked below.
		if ct := resp.Header.Get("Content-Type"); ct != "" {
			if mt, _, _ := mime.ParseMediaType(ct); mt != ContentType && mt != "application/octet-stream" {
				return fmt.Errorf("worker: the async result is %q, not a job stream", ct)
			}
		}
	} else if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt != ContentType {
		return &NotAcceptedError{Status: resp.StatusCode, Err: fmt.Errorf("the answer is %q, not a job stream", resp.Header.Get("Content-Type"))}
	}

	st := &stream{ctx: ctx, fr: NewReader(resp.Body)}
	if c.MaxEventSize > 0 || c.MaxBinarySize > 0 {
		st.fr.SkipOver = func(k Kind) int {
			switch k {
			case KindEvent:
				return c.MaxEventSize
			case KindBinary:
				return c.MaxBinarySize
			}
			return 0
		}
	}
	idle := c.IdleTimeout
	if idle == 0 {
		idle = DefaultClientIdle
	}
	if idle > 0 {
		st.idle = idle
		st.timer = time.AfterFunc(time.Hour, func() { cancel(errIdle) })
		st.timer.Stop()
		defer st.timer.Stop()
	}

	// The first frame says whether ComfyUI took the prompt.
	k, p, err := st.next()
	if err != nil {
		if ctx.Err() != nil && context.Cause(ctx) != errIdle {
			return context.Cause(ctx)
		}
		if fromResult {
			return fmt.Errorf("worker: the async result ended before the job was accepted: %w", err)
		}
		return &NotAcceptedError{Status: resp.StatusCode, Err: fmt.Errorf("the stream ended before the job was accepted: %w", err)}
	}
	switch k {
	case KindAccepted:
		var a AcceptedInfo
		if err := json.Unmarshal(p, &a); err != nil {
			return fmt.Errorf("worker: bad accepted frame: %w", err)
		}
		if a.PromptID == "" {
			a.PromptID = job.PromptID
		}
		h.Accepted(a.PromptID, a.Number)
	case KindRejected:
		var r RejectedInfo
		if err := json.Unmarshal(p, &r); err != nil {
			return fmt.Errorf("worker: bad rejected frame: %w", err)
		}
		body := []byte(r.Body)
		var s string
		if json.Unmarshal(r.Body, &s) == nil {
			body = []byte(s) // a non-JSON body, carried as a string
		}
		return &RejectedError{Status: r.Status, Body: body}
	case KindError:
		return &WorkerError{Message: errorMessage(p)}
	default:
		if fromResult {
			return fmt.Errorf("worker: the async result is not a job stream (first frame %s)", k)
		}
		return &NotAcceptedError{Status: resp.StatusCode, Err: fmt.Errorf("unexpected first frame %s", k)}
	}

	for {
		k, p, err := st.next()
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return st.broken(err)
		}
		if oh, ok := h.(OversizedHandler); ok && st.fr.Skipped > st.reported {
			st.reported = st.fr.Skipped
			oh.Oversized(st.reported)
		}
		switch k {
		case KindEvent:
			head, ok := comfy.ScanEvent(p)
			if !ok {
				return fmt.Errorf("worker: bad event frame: %q", truncate(p, 200))
			}
			h.Event(p, head)
		case KindBinary:
			h.Binary(p)
		case KindOutputBegin:
			var info OutputInfo
			if err := json.Unmarshal(p, &info); err != nil {
				return fmt.Errorf("worker: bad output begin frame: %w", err)
			}
			body := &outputBody{st: st, id: info.ID, size: info.Size}
			herr := h.Output(info.FileRef, info.ContentType, body)
			if st.fatal != nil {
				return st.broken(st.fatal)
			}
			if herr != nil {
				return fmt.Errorf("worker: output %s: %w", info.Filename, herr)
			}
			if err := body.drain(); err != nil {
				return st.broken(err)
			}
		case KindDone:
			return nil
		case KindError:
			return &WorkerError{Message: errorMessage(p)}
		case KindOutputChunk, KindOutputEnd:
			return fmt.Errorf("worker: %s frame outside an output", k)
		default:
			// Unknown kinds are skipped, for newer workers.
		}
	}
}

func errorMessage(p []byte) string {
	var ei ErrorInfo
	if json.Unmarshal(p, &ei) == nil && ei.Message != "" {
		return ei.Message
	}
	return string(truncate(p, 500))
}

// writeBody sends the job frame, the files and the start frame.
func writeBody(w io.Writer, spec []byte, files []InputFile) error {
	fw := NewWriter(w)
	if err := fw.Write(KindJob, spec); err != nil {
		return err
	}
	var buf []byte
	if len(files) > 0 {
		buf = make([]byte, DefaultChunkSize)
	}
	for i, f := range files {
		id := uint32(i + 1)
		rc, err := f.Open()
		if err != nil {
			return &inputError{fmt.Errorf("opening input %s: %w", f.Ref.Filename, err)}
		}
		err = func() error {
			defer rc.Close()
			for {
				n, rerr := io.ReadFull(rc, buf)
				if n > 0 {
					if err := fw.WriteID(KindFileChunk, id, buf[:n]); err != nil {
						return err
					}
				}
				if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
					return fw.WriteID(KindFileEnd, id, nil)
				}
				if rerr != nil {
					return &inputError{fmt.Errorf("reading input %s: %w", f.Ref.Filename, rerr)}
				}
			}
		}()
		if err != nil {
			return err
		}
	}
	return fw.Write(KindStart)
}

// stream reads the worker's frames, skipping heartbeats and watching the
// idle timeout.
type stream struct {
	ctx   context.Context
	fr    *Reader
	idle  time.Duration
	timer *time.Timer
	fatal error // the stream broke while an output body was read
	// reported is how many skipped frames the handler was told of.
	reported int
}

func (s *stream) next() (Kind, []byte, error) {
	for {
		if s.timer != nil {
			s.timer.Reset(s.idle)
		}
		k, p, err := s.fr.Next()
		if s.timer != nil {
			s.timer.Stop()
		}
		if err != nil {
			if s.ctx.Err() != nil {
				return 0, nil, context.Cause(s.ctx)
			}
			return 0, nil, err
		}
		if k == KindHeartbeat {
			continue
		}
		return k, p, nil
	}
}

// broken wraps an error that ended the stream after acceptance.
func (s *stream) broken(err error) error {
	if s.ctx.Err() != nil {
		if cause := context.Cause(s.ctx); cause != errIdle {
			return cause
		}
		return errIdle
	}
	return fmt.Errorf("worker: stream broken: %w", err)
}

// outputBody reads one output's chunks straight off the stream.
type outputBody struct {
	st     *stream
	id     uint32
	size   int64
	buf    []byte
	err    error // io.EOF at the end, or the worker's error for a cut file
	ended  bool
	broken bool
}

// Size is the file size the worker announced, -1 if unknown.
func (b *outputBody) Size() int64 { return b.size }

func (b *outputBody) fill() error {
	for len(b.buf) == 0 {
		if b.err != nil {
			return b.err
		}
		k, p, err := b.st.next()
		if err != nil {
			b.st.fatal, b.err, b.broken = err, err, true
			return err
		}
		if k != KindOutputChunk && k != KindOutputEnd {
			err := fmt.Errorf("worker: %s frame inside output %d", k, b.id)
			b.st.fatal, b.err, b.broken = err, err, true
			return err
		}
		id, data, err := SplitID(p)
		if err == nil && id != b.id {
			err = fmt.Errorf("worker: chunk of output %d inside output %d", id, b.id)
		}
		if err != nil {
			b.st.fatal, b.err, b.broken = err, err, true
			return err
		}
		if k == KindOutputEnd {
			b.ended = true
			b.err = io.EOF
			if len(data) > 0 {
				b.err = fmt.Errorf("worker: output cut short: %s", data)
			}
			continue
		}
		b.buf = data
	}
	return nil
}

func (b *outputBody) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if err := b.fill(); err != nil {
		return 0, err
	}
	n := copy(p, b.buf)
	b.buf = b.buf[n:]
	return n, nil
}

// WriteTo hands whole chunks to w (io.Copy uses it).
func (b *outputBody) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		if err := b.fill(); err != nil {
			if err == io.EOF {
				return total, nil
			}
			return total, err
		}
		n, err := w.Write(b.buf)
		total += int64(n)
		b.buf = b.buf[n:]
		if err != nil {
			return total, err
		}
	}
}

// drain skips what the handler left unread; it fails only when the stream
// itself broke.
func (b *outputBody) drain() error {
	for !b.ended && !b.broken {
		b.buf = nil
		if err := b.fill(); err != nil && b.broken {
			return err
		}
	}
	if b.broken {
		return b.err
	}
	return nil
}
