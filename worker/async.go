package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// DefaultAsyncPoll is the default AsyncOptions.Poll.
const DefaultAsyncPoll = 2 * time.Second

// Statuses of an asynchronous request on Verda's serverless containers
// (shared/comfyui-protocol.md §7.1).
const (
	AsyncInitialized = "Initialized"
	AsyncQueue       = "Queue"
	AsyncInference   = "Inference"
	AsyncCompleted   = "Completed"
)

// AsyncOptions make a Client talk to a platform that only offers
// asynchronous request/response HTTP (Verda's "Prefer: respond-async").
// The worker needs no change for it: its response is the job's frame
// stream, which the platform stores whole and hands back from its result
// endpoint.
//
// Run then sends the job request with "Prefer: respond-async" and
// expects 202 with the inference id (JSON "Id", or the X-Inference-Id
// header). A platform that ignores Prefer and answers 200 with a frame
// stream is handled as in streaming mode; any other answer to the
// submission (and a submission that fails) is handled as in streaming
// mode too, so that a *NotAcceptedError lets the caller retry or fail
// over. After the 202 Run polls StatusURL (GET with X-Inference-Id and
// the Client's Header) every Poll until the status is "Completed", then
// GETs ResultURL and reads its body as the worker's frame stream,
// delivering Accepted, Events, Binary and Output exactly as streaming
// mode does: complete and in order, but only once the job has ended
// (outputs are streamed off the result body, not held in memory).
//
// Handler.Accepted is called when the result arrives (from its accepted
// frame), never earlier: only the result tells whether ComfyUI took the
// prompt (a rejected result gives a *RejectedError with no Accepted call)
// and its queue number. Progress reports the platform status meanwhile;
// "Inference" is the earliest sign that the job runs.
//
// Errors after the 202 are plain errors, not *NotAcceptedError: the job
// may have run. A result that is not a frame stream, or that ends before
// done, is an error. A stored result that is the worker's refusal (503
// when its ComfyUI was down, and the like) is reported as in streaming
// mode. Status polls that fail on the network or answer 5xx/429, and
// result fetches that fail on the network or answer 425 Too Early, are
// retried every Poll, up to maxPollFailures (5) times in a row; a status
// poll answered with another 4xx (unknown or expired id, auth) ends Run
// at once. Any other answer from the result URL is taken as the stored
// response.
//
// Cancelling ctx makes Run return the context's error at once, but the
// job goes on remotely: Verda has no way to cancel an asynchronous
// request, so the prompt runs to its end and its result is dropped.
type AsyncOptions struct {
	// StatusURL and ResultURL are polled with the inference id (Verda:
	// <base>/status/<deployment>, <base>/result/<deployment>). When
	// empty, the StatusPath and ResultPath of the 202 answer (or its
	// Location header, for the result) are used, resolved against the
	// Client's URL.
	StatusURL, ResultURL string
	// Poll is the polling interval (default 2s).
	Poll time.Duration
	// Progress, if set, is called while the job waits or runs remotely
	// (status text such as "Queue" / "Inference", and the time since
	// submission) so the gateway can synthesize progress for the UI. It
	// is called after every successful status poll, "Completed"
	// included, from the goroutine that called Run.
	Progress func(status string, elapsed time.Duration)
}

// maxPollFailures is how many status polls or result fetches in a row
// may fail before Run gives up.
const maxPollFailures = 5

// pollTimeout bounds one status poll (not the result download).
const pollTimeout = 30 * time.Second

// asyncJob is a submitted asynchronous request.
type asyncJob struct {
	id                   string
	statusURL, resultURL string
}

// submitted reads the 202 answer to an asynchronous submission.
func (c *Client) submitted(resp *http.Response) (*asyncJob, error) {
	var body struct {
		ID         string `json:"Id"`
		StatusPath string `json:"StatusPath"`
		ResultPath string `json:"ResultPath"`
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	_ = json.Unmarshal(b, &body) // the header may carry everything
	j := &asyncJob{id: body.ID, statusURL: c.Async.StatusURL, resultURL: c.Async.ResultURL}
	if j.id == "" {
		j.id = resp.Header.Get("X-Inference-Id")
	}
	if j.id == "" {
		return nil, fmt.Errorf("worker: the platform accepted the job (202) without an inference id: %s", truncate(b, 200))
	}
	resolve := func(ref string) string {
		if ref == "" {
			return ""
		}
		base, err := url.Parse(c.URL)
		if err != nil {
			return ""
		}
		u, err := base.Parse(ref)
		if err != nil {
			return ""
		}
		return u.String()
	}
	if j.statusURL == "" {
		j.statusURL = resolve(body.StatusPath)
	}
	if j.resultURL == "" {
		j.resultURL = resolve(body.ResultPath)
	}
	if j.resultURL == "" {
		j.resultURL = resolve(resp.Header.Get("Location"))
	}
	if j.statusURL == "" || j.resultURL == "" {
		return nil, fmt.Errorf("worker: async job %s: no status or result URL (set AsyncOptions)", j.id)
	}
	return j, nil
}

// pollError is a failed status poll or result fetch; fatal ones end Run.
type pollError struct {
	fatal bool
	err   error
}

func (e *pollError) Error() string { return e.err.Error() }
func (e *pollError) Unwrap() error { return e.err }

// await polls until the job completed and returns the result response
// (status and body as the worker answered, per the platform).
func (c *Client) await(ctx context.Context, j *asyncJob, submitted time.Time) (*http.Response, error) {
	poll := c.Async.Poll
	if poll <= 0 {
		poll = DefaultAsyncPoll
	}
	t := time.NewTimer(poll)
	defer t.Stop()
	fails := 0
	completed := false
	for {
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-t.C:
		}
		var err error
		if !completed {
			var st string
			st, err = c.pollStatus(ctx, j)
			if err == nil {
				if c.Async.Progress != nil {
					c.Async.Progress(st, time.Since(submitted))
				}
				switch strings.ToLower(st) {
				case "completed":
					completed = true
				case "failed", "error", "canceled", "cancelled", "expired":
					return nil, fmt.Errorf("worker: async job %s: the platform reports %q", j.id, st)
				}
			}
		}
		if completed {
			var resp *http.Response
			resp, err = c.fetchResult(ctx, j)
			if err == nil {
				return resp, nil
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			var pe *pollError
			fails++
			if (errors.As(err, &pe) && pe.fatal) || fails >= maxPollFailures {
				return nil, fmt.Errorf("worker: async job %s: %w", j.id, err)
			}
		} else {
			fails = 0
		}
		t.Reset(poll)
	}
}

func (c *Client) asyncRequest(ctx context.Context, u, id string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, &pollError{fatal: true, err: err}
	}
	for k, v := range c.Header {
		req.Header[k] = append([]string(nil), v...)
	}
	req.Header.Set("X-Inference-Id", id)
	return req, nil
}

// pollStatus asks for the job's status once.
func (c *Client) pollStatus(ctx context.Context, j *asyncJob) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, pollTimeout)
	defer cancel()
	req, err := c.asyncRequest(ctx, j.statusURL, j.id)
	if err != nil {
		return "", err
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		return "", &pollError{err: fmt.Errorf("status: %w", err)}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		transient := resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests
		return "", &pollError{fatal: !transient, err: fmt.Errorf("status: HTTP %d: %s", resp.StatusCode, truncate(b, 200))}
	}
	var st struct {
		Status string `json:"Status"`
	}
	if err := json.Unmarshal(b, &st); err != nil || st.Status == "" {
		return "", &pollError{err: fmt.Errorf("status: bad answer %q", truncate(b, 200))}
	}
	return st.Status, nil
}

// fetchResult GETs the stored response. A 425 (not ready yet) and network
// failures are retryable; any other answer is the stored response.
func (c *Client) fetchResult(ctx context.Context, j *asyncJob) (*http.Response, error) {
	req, err := c.asyncRequest(ctx, j.resultURL, j.id)
	if err != nil {
		return nil, err
	}
	resp, err := c.httpClient().Do(req)
	if err != nil {
		return nil, &pollError{err: fmt.Errorf("result: %w", err)}
	}
	if resp.StatusCode == http.StatusTooEarly {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		return nil, &pollError{err: fmt.Errorf("result: HTTP 425: %s", truncate(b, 200))}
	}
	return resp, nil
}
