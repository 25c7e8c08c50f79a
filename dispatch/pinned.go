package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/worker"
)

// Pinned jobs. An upstream with the "worker" transport is a GPU deployment
// whose containers run comfyume's worker handler in front of their own
// ComfyUI, behind a load balancer that may send every request to a
// different container. Such a job travels in ONE streaming request: its
// body carries the prompt and the input files, its response carries every
// event, preview and output file back. Nothing depends on two requests
// reaching the same container.

// WorkerPath is where the worker handler is mounted on a pinned upstream.
const WorkerPath = "/comfyume/job"

// OutputStore receives output files that arrive with a job's events (pinned
// jobs), before the executed event naming them is handled.
type OutputStore interface {
	StoreOutput(ctx context.Context, j *Job, ref comfy.FileRef, contentType string, body io.Reader) error
}

type acceptance struct {
	number float64
	err    error
}

// sendPinned runs the job on a pinned upstream. It returns once the worker
// accepted (or refused) the job; the stream then goes on in the background.
func (m *Manager) sendPinned(ctx context.Context, r *run, up *Upstream) (SubmitResult, error) {
	job := r.snapshot()
	pr := r.req.Request
	plan, err := planInputs(job.ID, pr)
	if err != nil {
		return SubmitResult{}, err
	}
	if r.req.Inputs != nil {
		if err := plan.openInputs(ctx, pr.Prompt, r.req.Inputs); err != nil {
			var rej *RejectedError
			if errors.As(err, &rej) {
				return SubmitResult{}, err
			}
			return SubmitResult{}, &UnavailableError{Pool: job.Pool, Err: err}
		}
	} else {
		plan = &inputPlan{prompt: pr.Prompt}
	}
	promptJSON, err := json.Marshal(plan.prompt)
	if err != nil {
		plan.close()
		return SubmitResult{}, err
	}
	wjob := worker.Job{PromptID: job.ID, Prompt: promptJSON}
	if ed := pr.ExtraDataWithout(comfy.SensitiveExtraData...); ed != nil {
		wjob.ExtraData, _ = json.Marshal(ed)
	}
	if v, ok := pr.Raw["partial_execution_targets"]; ok {
		wjob.PartialExecutionTargets = v
	}
	for _, f := range plan.files {
		f := f
		wjob.Files = append(wjob.Files, worker.InputFile{Ref: f.dest, Open: func() (io.ReadCloser, error) {
			b := f.body
			f.body = nil
			if b == nil {
				return nil, errors.New("input already sent")
			}
			return b, nil
		}})
	}
	limits := m.eventLimits()
	client := &worker.Client{URL: up.URL(WorkerPath), Header: up.Header.Clone(), HTTP: up.client,
		MaxEventSize: int(limits.MaxText), MaxBinarySize: int(limits.MaxBinary)}
	h := &pinnedHandler{m: m, r: r, accepted: make(chan acceptance, 1)}
	if up.Async {
		// Submit-and-poll platforms: the job counts as accepted once the
		// platform has queued it (the first status answer); progress is
		// shown from the platform's status until the result arrives.
		client.Async = &worker.AsyncOptions{Progress: h.progress}
	}
	runCtx, cancel := context.WithCancel(context.Background())
	r.mu.Lock()
	r.up = up
	r.job.Upstream = up.String()
	r.job.UpstreamID = job.ID
	r.job.Transport = TransportWorker
	r.cancelRun = cancel
	r.mu.Unlock()
	go func() {
		err := client.Run(runCtx, wjob, h)
		plan.close()
		cancel()
		h.end(err)
	}()
	select {
	case a := <-h.accepted:
		if a.err != nil {
			r.mu.Lock()
			r.up, r.cancelRun = nil, nil
			r.job.Upstream, r.job.UpstreamID = "", ""
			r.mu.Unlock()
			if f, err := plan.readFailure(); f != nil {
				// The user's file failed while it was being sent: their
				// error, not the endpoint's.
				return SubmitResult{}, inputFailure(pr.Prompt, f, err)
			}
			return SubmitResult{}, pinnedError(job.Pool, a.err)
		}
		r.mu.Lock()
		r.lastEvent = time.Now()
		r.mu.Unlock()
		r.save()
		return SubmitResult{PromptID: job.ID, Number: job.Number, NodeErrors: json.RawMessage("{}")}, nil
	case <-ctx.Done():
		cancel()
		return SubmitResult{}, &UnavailableError{Pool: job.Pool, Err: ctx.Err()}
	}
}

// pinnedError maps a worker client error before acceptance.
func pinnedError(pool string, err error) error {
	var rej *worker.RejectedError
	var na *worker.NotAcceptedError
	var we *worker.WorkerError
	switch {
	case errors.As(err, &rej):
		return &RejectedError{Status: rej.Status, Body: rej.Body}
	case errors.As(err, &na):
		return &UnavailableError{Pool: pool, Err: err}
	case errors.As(err, &we):
		return &RejectedError{Status: 400, Body: comfy.NewPromptError("server_error", "The GPU server refused the job", we.Error()).JSON()}
	}
	return &UnavailableError{Pool: pool, Err: err}
}

// pinnedHandler turns a pinned job's stream into the run's events.
type pinnedHandler struct {
	m        *Manager
	r        *run
	accepted chan acceptance
	once     sync.Once
	ok       bool
}

func (h *pinnedHandler) Accepted(_ string, number float64) {
	h.once.Do(func() {
		h.ok = true
		h.accepted <- acceptance{number: number}
	})
}

func (h *pinnedHandler) Event(frame []byte, head comfy.Head) {
	h.r.push(event{json: frame, head: head})
}

// Oversized logs frames skipped over the event limits, once per job.
func (h *pinnedHandler) Oversized(skipped int) {
	if skipped == 1 {
		h.m.logger.Warn("skipping a frame over the size limit from the GPU server (further ones of this job are skipped silently)",
			zap.String("job", h.r.job.ID))
	}
}

func (h *pinnedHandler) Binary(frame []byte) {
	if ev, _, ok := binaryEvent(frame); ok {
		h.r.push(ev)
	}
}

func (h *pinnedHandler) Output(ref comfy.FileRef, contentType string, body io.Reader) error {
	store, ok := h.m.events.(OutputStore)
	if !ok {
		_, err := io.Copy(io.Discard, body)
		return err
	}
	// The worker sends a file before the executed event that names it, so
	// it is stored before that event is captured and shown.
	return store.StoreOutput(context.Background(), h.r.snapshot(), ref, contentType, body)
}

// progress reports an async job's platform status: the first report
// accepts the job; each is shown to the browser.
func (h *pinnedHandler) progress(status string, elapsed time.Duration) {
	h.Accepted(h.r.job.ID, 0)
	if status == worker.AsyncCompleted {
		return
	}
	notify(h.m.events, h.r.snapshot(), fmt.Sprintf("GPU job %s (%s)…", strings.ToLower(status), elapsed.Round(time.Second)))
}

// end is called when the stream is over.
func (h *pinnedHandler) end(err error) {
	refused := false
	h.once.Do(func() {
		refused = true
		if err == nil {
			err = errors.New("the worker ended the stream without accepting the job")
		}
		h.accepted <- acceptance{err: err}
	})
	if refused {
		return
	}
	r := h.r
	r.mu.Lock()
	finished, cancelled := r.finished, r.cancelled
	node := r.node
	r.mu.Unlock()
	if finished {
		return
	}
	if cancelled {
		r.pushMessage(comfy.NewMessage(comfy.MsgExecutionInterrupted, map[string]any{
			"prompt_id": r.job.ID, "node_id": node, "node_type": "", "executed": []string{},
			"timestamp": time.Now().UnixMilli(),
		}))
		return
	}
	var rej *worker.RejectedError
	if errors.As(err, &rej) {
		// An async platform answers validation errors with the result.
		h.m.failUnsent(r, &RejectedError{Status: rej.Status, Body: rej.Body})
		return
	}
	msg := "The stream from the GPU server ended before the job did"
	if err != nil {
		msg = fmt.Sprintf("%s: %v", msg, err)
	}
	r.fail(PublicMessage(r.job.Pool, msg))
}
