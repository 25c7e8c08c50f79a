package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"

	"github.com/comfyume/comfyume/comfy"
)

// fileInputs names, per node class, the input that holds a file in the
// server's input directory, and the directory its plain values refer to.
var fileInputs = map[string]struct{ input, typ string }{
	"LoadImage":       {"image", comfy.TypeInput},
	"LoadImageMask":   {"image", comfy.TypeInput},
	"LoadImageOutput": {"image", comfy.TypeOutput},
	"LoadAudio":       {"audio", comfy.TypeInput},
	"LoadVideo":       {"file", comfy.TypeInput},
	"Load3D":          {"model_file", comfy.TypeInput},
	"Load3DAnimation": {"model_file", comfy.TypeInput},
}

// InputsSubfolder is the input subfolder on GPU servers under which each
// job's forwarded files are stored: "<InputsSubfolder>/<prompt_id>/...".
// One directory per job keeps users of a shared GPU from overwriting or
// reading each other's inputs.
const InputsSubfolder = "comfyume"

// annotated reports whether a string input value carries a " [input]",
// " [output]" or " [temp]" file annotation.
func annotated(v string) bool {
	return strings.HasSuffix(v, " [input]") || strings.HasSuffix(v, " [output]") || strings.HasSuffix(v, " [temp]")
}

// MaxInputFiles is how many different files one prompt may reference; a
// prompt naming more is refused (400) before anything is fetched.
const MaxInputFiles = 256

// MaxInputBytes is the largest input file the gateway forwards: ComfyUI's
// own default --max-upload-size (100 MB). A larger file is the user's
// error, reported on the node that names it.
const MaxInputBytes = 100 << 20

// inputConcurrency is how many of one prompt's input files are fetched and
// uploaded at the same time. Each is opened, uploaded and closed in turn,
// so a prompt never holds more files open than this.
const inputConcurrency = 4

// place is one node input that names a file.
type place struct{ node, input string }

// inputFile is one file a prompt references: where it comes from (src, on
// the user's home or among their captured outputs), where it goes on the
// GPU server (dest, in the job's own folder), and the inputs naming it.
type inputFile struct {
	src, dest comfy.FileRef
	places    []place
	body      io.ReadCloser // opened by openInputs
	read      *limitedInput // body, as opened
}

// readFailure returns a file of the plan whose reading failed, or nil.
func (p *inputPlan) readFailure() (*inputFile, error) {
	for _, f := range p.files {
		if f.read != nil {
			if err := f.read.failed(); err != nil {
				return f, err
			}
		}
	}
	return nil, nil
}

// inputPlan is a prompt's files and the prompt rewritten to name their
// copies on the GPU server.
type inputPlan struct {
	prompt map[string]comfy.Node
	files  []*inputFile
}

// planInputs finds the files the prompt references (file inputs of known
// loader nodes, and any "name [input|output|temp]" value) and rewrites a
// copy of the prompt to name their copies in the job's folder. pr is not
// modified. Values that do not name exactly one file inside its directory
// (comfy.ParseAnnotated) are refused as ComfyUI refuses an image file it
// does not have, and so is a prompt naming more than MaxInputFiles files
// (a *RejectedError). Each file is listed once however many inputs name it.
func planInputs(jobID string, pr *comfy.PromptRequest) (*inputPlan, error) {
	plan := &inputPlan{prompt: make(map[string]comfy.Node, len(pr.Prompt))}
	bySrc := map[comfy.FileRef]*inputFile{}
	var refused []missingInput
	ids := make([]string, 0, len(pr.Prompt))
	for id := range pr.Prompt {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		n := pr.Prompt[id]
		var inputs map[string]json.RawMessage
		names := make([]string, 0, len(n.Inputs))
		for name := range n.Inputs {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			raw := n.Inputs[name]
			if len(raw) == 0 || raw[0] != '"' {
				continue // not a string: a number, a link, a list
			}
			var v string
			if json.Unmarshal(raw, &v) != nil || v == "" {
				continue
			}
			fi, known := fileInputs[n.ClassType]
			isFileInput := known && fi.input == name
			if !isFileInput && !annotated(v) {
				continue
			}
			typ := comfy.TypeInput
			if isFileInput {
				typ = fi.typ
			}
			src, err := comfy.ParseAnnotated(v, typ)
			if err != nil {
				refused = append(refused, missingInput{node: id, classType: n.ClassType, input: name, value: v})
				continue
			}
			f := bySrc[src]
			if f == nil {
				if len(plan.files) == MaxInputFiles {
					return nil, &RejectedError{Status: 400, Body: comfy.NewPromptError("prompt_outputs_failed_validation",
						"Too many input files",
						fmt.Sprintf("The prompt names more than %d different input files; the gateway forwards at most %d per prompt.", MaxInputFiles, MaxInputFiles)).JSON()}
				}
				f = &inputFile{src: src, dest: inputDest(jobID, src)}
				bySrc[src] = f
				plan.files = append(plan.files, f)
			}
			f.places = append(f.places, place{id, name})
			if inputs == nil {
				inputs = make(map[string]json.RawMessage, len(n.Inputs))
				for k, v := range n.Inputs {
					inputs[k] = v
				}
			}
			inputs[name], _ = json.Marshal(f.dest.Annotated())
		}
		if inputs != nil {
			n.Inputs = inputs
		}
		plan.prompt[id] = n
	}
	if len(refused) > 0 {
		return nil, &RejectedError{Status: 400, Body: missingInputsBody(pr.Prompt, refused)}
	}
	return plan, nil
}

// inputDest is where a checked source file goes on the GPU server: the
// job's own input folder, then the source's type (unless input) and
// subfolder, built from checked names only.
func inputDest(jobID string, src comfy.FileRef) comfy.FileRef {
	dest := comfy.FileRef{Filename: src.Filename, Subfolder: InputsSubfolder + "/" + jobID, Type: comfy.TypeInput}
	if src.Type != comfy.TypeInput {
		dest.Subfolder += "/" + src.Type
	}
	if src.Subfolder != "" {
		dest.Subfolder += "/" + src.Subfolder
	}
	return dest
}

// checkInputs refuses, before a job is made, a prompt whose file values
// planInputs would refuse.
func checkInputs(pr *comfy.PromptRequest) error {
	_, err := planInputs("00000000-0000-0000-0000-000000000000", pr)
	return err
}

// rename points the inputs naming f at the name the server stored it
// under (when it differs from the planned one).
func (p *inputPlan) rename(f *inputFile, stored comfy.FileRef) {
	v, _ := json.Marshal(stored.Annotated())
	for _, pl := range f.places {
		n := p.prompt[pl.node]
		inputs := make(map[string]json.RawMessage, len(n.Inputs))
		for k, x := range n.Inputs {
			inputs[k] = x
		}
		inputs[pl.input] = v
		n.Inputs = inputs
		p.prompt[pl.node] = n
	}
}

// notThere reports whether an error opening an input means the user's
// sources do not have the file.
func notThere(err error) bool {
	var he *HTTPError
	return errors.Is(err, ErrNotFound) || errors.As(err, &he) && (he.Status == 404 || he.Status == 400 || he.Status == 403)
}

// missing lists, for an error body, the inputs that name f.
func (f *inputFile) missing(original map[string]comfy.Node) []missingInput {
	out := make([]missingInput, 0, len(f.places))
	for _, pl := range f.places {
		n := original[pl.node]
		var v string
		_ = json.Unmarshal(n.Inputs[pl.input], &v)
		out = append(out, missingInput{node: pl.node, classType: n.ClassType, input: pl.input, value: v})
	}
	return out
}

// openInputs opens every planned file from the user's sources (pinned jobs
// stream them in one request). Files they do not have make the prompt fail
// validation here, as ComfyUI would on home; the GPU server's own files
// are never used, so one user cannot load another's. A source that fails
// otherwise is the user's error too (an *InputError), never the GPU
// server's. On error nothing stays open.
func (p *inputPlan) openInputs(ctx context.Context, original map[string]comfy.Node, open InputSource) error {
	var missing []missingInput
	for _, f := range p.files {
		rc, err := open(ctx, f.src)
		switch {
		case err == nil:
			f.read = &limitedInput{r: rc, left: MaxInputBytes}
			f.body = f.read
			continue
		case notThere(err):
			missing = append(missing, f.missing(original)...)
		default:
			p.close()
			return inputFailure(original, f, err)
		}
	}
	if len(missing) > 0 {
		p.close()
		return &RejectedError{Status: 400, Body: missingInputsBody(original, missing)}
	}
	return nil
}

// close closes the files still open.
func (p *inputPlan) close() {
	for _, f := range p.files {
		if f.body != nil {
			f.body.Close()
			f.body = nil
		}
	}
}

// missingInput is a referenced file the user's sources do not have.
type missingInput struct {
	node, classType, input, value string
}

// errInputTooLarge is a source file beyond MaxInputBytes.
var errInputTooLarge = fmt.Errorf("the file is larger than %d MB", MaxInputBytes>>20)

// limitedInput reads a source file up to MaxInputBytes and remembers why
// reading it failed, so that a failed upload can be told apart: the
// user's file (their error) or the GPU server (a cold start).
type limitedInput struct {
	r    io.ReadCloser
	left int64

	mu  sync.Mutex
	err error
}

func (l *limitedInput) fail(err error) error {
	if err != nil && err != io.EOF {
		l.mu.Lock()
		if l.err == nil {
			l.err = err
		}
		l.mu.Unlock()
	}
	return err
}

// failed is why reading the file failed (nil: it did not).
func (l *limitedInput) failed() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

func (l *limitedInput) Read(b []byte) (int, error) {
	if l.left <= 0 {
		// One byte more than allowed tells a file of exactly the limit
		// from a larger one.
		var one [1]byte
		n, err := l.r.Read(one[:])
		if n > 0 {
			return 0, l.fail(errInputTooLarge)
		}
		return 0, l.fail(err)
	}
	if int64(len(b)) > l.left {
		b = b[:l.left]
	}
	n, err := l.r.Read(b)
	l.left -= int64(n)
	return n, l.fail(err)
}

func (l *limitedInput) Close() error { return l.r.Close() }

// InputError is a prompt's input file that the user's sources could not
// deliver (home unreachable, a read that failed, a file too large). It is
// the user's error: the job fails with it (a 400 naming the node when the
// prompt is being submitted), the endpoint it was meant for is not blamed.
type InputError struct {
	Ref comfy.FileRef
	Err error
}

func (e *InputError) Error() string {
	return fmt.Sprintf("input file %s: %v", e.Ref.Annotated(), e.Err)
}

func (e *InputError) Unwrap() error { return e.Err }

// inputFailure is ComfyUI's 400 for an input file that could not be read,
// on every node naming it; it unwraps to the *InputError.
func inputFailure(original map[string]comfy.Node, f *inputFile, err error) error {
	reason := "it could not be read"
	if errors.Is(err, errInputTooLarge) {
		reason = errInputTooLarge.Error()
	}
	places := f.missing(original)
	nodeErrors := map[string]any{}
	sinks := sinkNodes(original)
	details := make([]string, 0, len(places))
	for _, m := range places {
		d := m.input + " - Could not read the input file " + m.value + ": " + reason
		details = append(details, d)
		nodeErrors[m.node] = map[string]any{
			"errors": []any{map[string]any{
				"type": "custom_validation_failed", "message": "Custom validation failed for node",
				"details": d, "extra_info": map[string]any{"input_name": m.input},
			}},
			"dependent_outputs": sinks,
			"class_type":        m.classType,
		}
	}
	pe := comfy.NewPromptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", strings.Join(details, "\n"))
	pe.NodeErrors, _ = json.Marshal(nodeErrors)
	return &inputRejected{RejectedError{Status: 400, Body: pe.JSON()}, &InputError{Ref: f.src, Err: err}}
}

// inputRejected is a RejectedError caused by an InputError.
type inputRejected struct {
	RejectedError
	cause *InputError
}

func (e *inputRejected) Unwrap() []error { return []error{&e.RejectedError, e.cause} }

// forwardInputs uploads every file the prompt references to up (ComfyUI's
// /upload/image), into the job's own folder, and returns the prompt
// rewritten to name those copies; pr is not modified. Files are fetched
// from the user's sources and uploaded a few at a time, each closed before
// the next is opened. A file the sources do not have or cannot deliver is
// a *RejectedError (the user's error); an upload the GPU server fails is
// returned as it is (the server's).
func forwardInputs(ctx context.Context, up *Upstream, jobID string, pr *comfy.PromptRequest, open InputSource) (map[string]comfy.Node, error) {
	plan, err := planInputs(jobID, pr)
	if err != nil {
		return nil, err
	}
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu        sync.Mutex
		wg        sync.WaitGroup
		missing   []missingInput
		userErr   error // the user's: stops everything
		serverErr error
		sem       = make(chan struct{}, inputConcurrency)
	)
	for _, f := range plan.files {
		mu.Lock()
		stop := userErr != nil || serverErr != nil
		mu.Unlock()
		if stop {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(f *inputFile) {
			defer func() { <-sem; wg.Done() }()
			rc, err := open(ctx, f.src)
			if err != nil {
				mu.Lock()
				defer mu.Unlock()
				switch {
				case notThere(err):
					missing = append(missing, f.missing(pr.Prompt)...)
				case userErr == nil && serverErr == nil && ctx.Err() == nil:
					userErr = inputFailure(pr.Prompt, f, err)
					cancel()
				}
				return
			}
			body := &limitedInput{r: rc, left: MaxInputBytes}
			defer body.Close()
			mu.Lock()
			skip := len(missing) > 0 // the prompt fails anyway: only look for more missing files
			mu.Unlock()
			if skip {
				return
			}
			stored, err := up.Upload(ctx, f.dest, body)
			var he *HTTPError
			if err == nil && stored.Check() != nil {
				err = fmt.Errorf("the GPU server stored %s under an invalid name", f.dest.Annotated())
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				if stored != f.dest {
					plan.rename(f, stored)
				}
			case userErr != nil || serverErr != nil:
			case parent.Err() != nil:
				serverErr = parent.Err()
			case body.failed() != nil:
				userErr = inputFailure(pr.Prompt, f, body.failed())
				cancel()
			case errors.As(err, &he) && he.Status == 413:
				userErr = inputFailure(pr.Prompt, f, errInputTooLarge)
				cancel()
			default:
				serverErr = fmt.Errorf("uploading %s: %w", f.src.Annotated(), err)
				cancel()
			}
		}(f)
	}
	wg.Wait()
	switch {
	case parent.Err() != nil && userErr == nil && serverErr == nil:
		return nil, parent.Err() // given up on: nothing is known about the files
	case userErr != nil:
		return nil, userErr
	case serverErr != nil:
		return nil, serverErr
	case len(missing) > 0:
		return nil, &RejectedError{Status: 400, Body: missingInputsBody(pr.Prompt, missing)}
	}
	return plan.prompt, nil
}

// missingInputsBody is ComfyUI's 400 for input files that do not exist, so
// the frontend marks the nodes red (bounded: see nodeErrors).
func missingInputsBody(prompt map[string]comfy.Node, missing []missingInput) []byte {
	byNode := map[string][]nodeError{}
	classOf := map[string]string{}
	for _, m := range missing {
		byNode[m.node] = append(byNode[m.node], nodeError{
			typ: "custom_validation_failed", message: "Custom validation failed for node",
			details: shown(m.input) + " - Invalid image file: " + shown(m.value), input: m.input,
		})
		classOf[m.node] = m.classType
	}
	ids := make([]string, 0, len(byNode))
	for id := range byNode {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	ne := newNodeErrors(prompt)
	for _, id := range ids {
		ne.add(id, classOf[id], byNode[id])
	}
	var re *RejectedError
	if !errors.As(ne.rejected(), &re) {
		return nil
	}
	return re.Body
}
