package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// missingInput is a referenced file the user's sources do not have.
type missingInput struct {
	node, classType, input, value string
}

// forwardInputs uploads every file the prompt references to up, into the
// job's own input subfolder, and points the prompt at those copies. Files
// that neither the user's home nor their captured outputs have make the
// prompt fail validation here, as ComfyUI would on home; the GPU server's
// own files are never used, so one user cannot load another's. It returns
// a rewritten copy of the prompt; pr is not modified.
func forwardInputs(ctx context.Context, up *Upstream, jobID string, pr *comfy.PromptRequest, open InputSource) (map[string]comfy.Node, error) {
	rewritten := make(map[string]comfy.Node, len(pr.Prompt))
	done := map[comfy.FileRef]string{}
	var missing []missingInput
	for id, n := range pr.Prompt {
		var inputs map[string]json.RawMessage
		for name, raw := range n.Inputs {
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
			ref := comfy.ParseAnnotated(v, typ)
			newValue, ok := done[ref]
			if !ok {
				var err error
				newValue, err = forwardOne(ctx, up, jobID, ref, open)
				if errors.Is(err, ErrNotFound) {
					missing = append(missing, missingInput{node: id, classType: n.ClassType, input: name, value: v})
					continue
				}
				if err != nil {
					return nil, fmt.Errorf("node %s input %q (%s): %w", id, name, v, err)
				}
				done[ref] = newValue
			}
			if inputs == nil {
				inputs = make(map[string]json.RawMessage, len(n.Inputs))
				for k, v := range n.Inputs {
					inputs[k] = v
				}
			}
			inputs[name], _ = json.Marshal(newValue)
		}
		if inputs != nil {
			n.Inputs = inputs
		}
		rewritten[id] = n
	}
	if len(missing) > 0 {
		return nil, &RejectedError{Status: 400, Body: missingInputsBody(pr.Prompt, missing)}
	}
	return rewritten, nil
}

// missingInputsBody is ComfyUI's 400 for input files that do not exist, so
// the frontend marks the nodes red.
func missingInputsBody(prompt map[string]comfy.Node, missing []missingInput) []byte {
	nodeErrors := map[string]any{}
	sinks := sinkNodes(prompt)
	for _, m := range missing {
		nodeErrors[m.node] = map[string]any{
			"errors": []any{map[string]any{
				"type":       "custom_validation_failed",
				"message":    "Custom validation failed for node",
				"details":    m.input + " - Invalid image file: " + m.value,
				"extra_info": map[string]any{"input_name": m.input},
			}},
			"dependent_outputs": sinks,
			"class_type":        m.classType,
		}
	}
	details := make([]string, 0, len(missing))
	for _, m := range missing {
		details = append(details, m.input+" - Invalid image file: "+m.value)
	}
	sort.Strings(details)
	pe := comfy.NewPromptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", strings.Join(details, "\n"))
	pe.NodeErrors, _ = json.Marshal(nodeErrors)
	return pe.JSON()
}

// forwardOne copies one file into the job's input subfolder on up and
// returns the value that names it there.
func forwardOne(ctx context.Context, up *Upstream, jobID string, ref comfy.FileRef, open InputSource) (string, error) {
	rc, err := open(ctx, ref)
	if err != nil {
		var he *HTTPError
		if errors.As(err, &he) && (he.Status == 404 || he.Status == 400 || he.Status == 403) {
			return "", ErrNotFound
		}
		return "", err
	}
	defer rc.Close()
	dest := comfy.FileRef{Filename: ref.Filename, Subfolder: InputsSubfolder + "/" + jobID, Type: comfy.TypeInput}
	if ref.Type != comfy.TypeInput {
		dest.Subfolder += "/" + ref.Type
	}
	if ref.Subfolder != "" {
		dest.Subfolder += "/" + ref.Subfolder
	}
	stored, err := up.Upload(ctx, dest, rc)
	if err != nil {
		return "", err
	}
	return stored.Annotated(), nil
}
