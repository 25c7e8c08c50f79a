package comfy

import "encoding/json"

// ErrorDetail is the "error" object of a failed POST /prompt.
type ErrorDetail struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Details   string         `json:"details"`
	ExtraInfo map[string]any `json:"extra_info"`
}

// PromptError is ComfyUI's 400 body for a rejected prompt:
// {"error": {...}, "node_errors": {...}}. The frontend shows Message and
// Details in its error dialog and marks the nodes named in NodeErrors.
type PromptError struct {
	Error      ErrorDetail     `json:"error"`
	NodeErrors json.RawMessage `json:"node_errors"`
}

// NewPromptError builds a prompt error with no node errors.
func NewPromptError(typ, message, details string) PromptError {
	return PromptError{
		Error:      ErrorDetail{Type: typ, Message: message, Details: details, ExtraInfo: map[string]any{}},
		NodeErrors: json.RawMessage("{}"),
	}
}

// JSON returns the encoded body.
func (e PromptError) JSON() []byte {
	b, _ := json.Marshal(e)
	return b
}

// JobsError is the body of a rejected /api/jobs request: {"error": "..."}.
type JobsError struct {
	Error string `json:"error"`
}
