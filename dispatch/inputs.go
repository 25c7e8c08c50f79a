package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

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

// place is one node input that names a file.
type place struct{ node, input string }

// inputFile is one file a prompt references: where it comes from (src, on
// the user's home or among their captured outputs), where it goes on the
// GPU server (dest, in the job's own folder), and the inputs naming it.
type inputFile struct {
	src, dest comfy.FileRef
	places    []place
	body      io.ReadCloser // opened by openInputs
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
// modified.
func planInputs(jobID string, pr *comfy.PromptRequest) *inputPlan {
	plan := &inputPlan{prompt: make(map[string]comfy.Node, len(pr.Prompt))}
	bySrc := map[comfy.FileRef]*inputFile{}
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
			var v string
			if json.Unmarshal(n.Inputs[name], &v) != nil || v == "" {
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
			src := comfy.ParseAnnotated(v, typ)
			f := bySrc[src]
			if f == nil {
				dest := comfy.FileRef{Filename: src.Filename, Subfolder: InputsSubfolder + "/" + jobID, Type: comfy.TypeInput}
				if src.Type != comfy.TypeInput {
					dest.Subfolder += "/" + src.Type
				}
				if src.Subfolder != "" {
					dest.Subfolder += "/" + src.Subfolder
				}
				f = &inputFile{src: src, dest: dest}
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
	return plan
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

// openInputs opens every planned file from the user's sources. Files they
// do not have make the prompt fail validation here, as ComfyUI would on
// home; the GPU server's own files are never used, so one user cannot load
// another's. On error nothing stays open.
func (p *inputPlan) openInputs(ctx context.Context, original map[string]comfy.Node, open InputSource) error {
	var missing []missingInput
	for _, f := range p.files {
		rc, err := open(ctx, f.src)
		var he *HTTPError
		switch {
		case err == nil:
			f.body = rc
			continue
		case errors.Is(err, ErrNotFound), errors.As(err, &he) && (he.Status == 404 || he.Status == 400 || he.Status == 403):
			for _, pl := range f.places {
				n := original[pl.node]
				var v string
				_ = json.Unmarshal(n.Inputs[pl.input], &v)
				missing = append(missing, missingInput{node: pl.node, classType: n.ClassType, input: pl.input, value: v})
			}
		default:
			p.close()
			return fmt.Errorf("opening input %s: %w", f.src.Annotated(), err)
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

// forwardInputs uploads every file the prompt references to up (ComfyUI's
// /upload/image), into the job's own folder, and returns the prompt
// rewritten to name those copies; pr is not modified.
func forwardInputs(ctx context.Context, up *Upstream, jobID string, pr *comfy.PromptRequest, open InputSource) (map[string]comfy.Node, error) {
	plan := planInputs(jobID, pr)
	if err := plan.openInputs(ctx, pr.Prompt, open); err != nil {
		return nil, err
	}
	defer plan.close()
	for _, f := range plan.files {
		stored, err := up.Upload(ctx, f.dest, f.body)
		f.body.Close()
		f.body = nil
		if err != nil {
			return nil, fmt.Errorf("uploading %s: %w", f.src.Annotated(), err)
		}
		if stored != f.dest {
			plan.rename(f, stored)
		}
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
