package comfy

import (
	"bytes"
	"encoding/json"
	"strconv"
)

// WebSocket message types a ComfyUI server sends as text frames.
const (
	MsgStatus               = "status"
	MsgFeatureFlags         = "feature_flags"
	MsgExecutionStart       = "execution_start"
	MsgExecutionCached      = "execution_cached"
	MsgExecuting            = "executing"
	MsgProgress             = "progress"
	MsgProgressState        = "progress_state"
	MsgExecuted             = "executed"
	MsgExecutionSuccess     = "execution_success"
	MsgExecutionError       = "execution_error"
	MsgExecutionInterrupted = "execution_interrupted"
	// MsgNotification is {"value": text, "id": prompt_id}: the current
	// frontend marks a job "initializing" when value says "Waiting for a
	// machine" (see dispatch's waiting notices).
	MsgNotification = "notification"
)

// Message is one text frame on ComfyUI's WebSocket: {"type": ..., "data": {...}}.
// Data is kept raw so that fields this package does not know survive a relay.
type Message struct {
	Type string          `json:"type"`
	Data json.RawMessage `json:"data"`
}

// ParseMessage decodes a text frame. It fails on anything that is not a JSON
// object with a string "type".
//
// It reads what encoding/json reads into a Message, keys as ComfyUI sends
// them (exact, escapes decoded; the last of a repeated key wins), without
// reflection: a job's every lifecycle event is parsed. Data is a copy.
func ParseMessage(b []byte) (Message, error) {
	var m Message
	var data []byte
	e := walkObject(b, skipSpace(b, 0), 0, func(key []byte, at int) int {
		switch unquote(key) {
		case "type":
			end, null := stringOrNullAt(b, at)
			if end >= 0 && !null {
				m.Type = messageType(b[at:end])
			}
			return end
		case "data":
			end := validValue(b, at, 1)
			if end >= 0 {
				data = b[at:end]
			}
			return end
		}
		return validValue(b, at, 1)
	})
	if e < 0 || skipSpace(b, e) != len(b) {
		return Message{}, errNotAMessage
	}
	if data != nil {
		m.Data = bytes.Clone(data)
	}
	if m.Type == "" {
		return m, errMissingType
	}
	return m, nil
}

type protoError string

func (e protoError) Error() string { return string(e) }

const (
	errMissingType = protoError("comfy: message without type")
	errNotAMessage = protoError("comfy: message is not a JSON object")
	errShortFrame  = protoError("comfy: binary frame too short")
	errBadMetadata = protoError("comfy: bad preview metadata")
)

// Encode returns the frame's JSON text.
func (m Message) Encode() []byte {
	data := m.Data
	if len(data) == 0 {
		data = json.RawMessage("{}")
	}
	// As json.Marshal writes the Message (nil when Data is not JSON),
	// without reflection: the gateway makes messages at every job's start
	// and end, for every socket of its user.
	b := make([]byte, 0, len(data)+len(m.Type)+20)
	b = append(b, `{"type":`...)
	b = appendMarshaledString(b, m.Type)
	b = append(b, `,"data":`...)
	b, err := appendCompact(b, data)
	if err != nil {
		return nil
	}
	return append(b, '}')
}

// NewMessage builds a message from any JSON-marshalable data value.
func NewMessage(typ string, data any) Message {
	b, err := json.Marshal(data)
	if err != nil {
		b = []byte("{}")
	}
	return Message{Type: typ, Data: b}
}

// IsTerminal reports whether a message type ends a job.
func IsTerminal(typ string) bool {
	switch typ {
	case MsgExecutionSuccess, MsgExecutionError, MsgExecutionInterrupted:
		return true
	}
	return false
}

// Fields decodes the message data as a JSON object, preserving numbers.
func (m Message) Fields() (map[string]any, error) {
	var f map[string]any
	d := json.NewDecoder(bytes.NewReader(m.Data))
	d.UseNumber()
	if err := d.Decode(&f); err != nil {
		return nil, err
	}
	if f == nil {
		return nil, errBadMetadata
	}
	return f, nil
}

// WithFields returns a copy of m whose data is f.
func (m Message) WithFields(f map[string]any) Message {
	b, err := json.Marshal(f)
	if err != nil {
		return m
	}
	return Message{Type: m.Type, Data: b}
}

// StatusData is the data of a "status" message.
type StatusData struct {
	Status struct {
		ExecInfo struct {
			QueueRemaining int `json:"queue_remaining"`
		} `json:"exec_info"`
	} `json:"status"`
	SID string `json:"sid,omitempty"`
}

// StatusMessage builds a "status" message; sid is included only when non-empty
// (ComfyUI includes it only in the first frame of a connection).
func StatusMessage(queueRemaining int, sid string) Message {
	// As json.Marshal writes StatusData, without reflection: every socket
	// of a user gets one at each start and end of the user's jobs.
	b := make([]byte, 0, 64+len(sid))
	b = append(b, `{"status":{"exec_info":{"queue_remaining":`...)
	b = strconv.AppendInt(b, int64(queueRemaining), 10)
	b = append(b, "}}"...)
	if sid != "" {
		b = append(b, `,"sid":`...)
		b = appendMarshaledString(b, sid)
	}
	return Message{Type: MsgStatus, Data: append(b, '}')}
}

// ParseStatus decodes the data of a "status" message.
func ParseStatus(m Message) (StatusData, error) {
	var s StatusData
	err := json.Unmarshal(m.Data, &s)
	return s, err
}

// ExecutingData is the subset of "executing" data the gateway reads.
type ExecutingData struct {
	Node        *string `json:"node"`
	DisplayNode string  `json:"display_node,omitempty"`
	PromptID    string  `json:"prompt_id,omitempty"`
}

// Common reads the fields most job events carry.
type Common struct {
	PromptID    string `json:"prompt_id"`
	Node        any    `json:"node"`
	NodeID      string `json:"node_id"`
	DisplayNode string `json:"display_node"`
	Timestamp   int64  `json:"timestamp"`
}

// Common decodes prompt_id, node and timestamp from the message data. Missing
// fields are zero; malformed data yields an error.
func (m Message) Common() (Common, error) {
	var c Common
	err := json.Unmarshal(m.Data, &c)
	return c, err
}

// NodeString returns the "node" field as a string ("" for null or absent).
func (c Common) NodeString() string {
	if s, ok := c.Node.(string); ok {
		return s
	}
	return ""
}

var typePrefix = []byte(`{"type":`)

// PeekType reads the type of a text frame that starts the way ComfyUI
// writes them, `{"type": "<name>"`, without decoding the rest. ok is false
// when the frame does not start that way (decode it to know).
func PeekType(b []byte) (typ string, ok bool) {
	rest, found := bytes.CutPrefix(b, typePrefix)
	if !found {
		return "", false
	}
	rest = bytes.TrimLeft(rest, " ")
	if len(rest) == 0 || rest[0] != '"' {
		return "", false
	}
	end := bytes.IndexByte(rest[1:], '"')
	if end < 0 || bytes.IndexByte(rest[1:1+end], '\\') >= 0 {
		return "", false
	}
	t := rest[1 : 1+end]
	// The frequent types without a copy (a string per frame adds up).
	switch string(t) {
	case MsgProgress:
		return MsgProgress, true
	case MsgProgressState:
		return MsgProgressState, true
	case MsgExecuting:
		return MsgExecuting, true
	case MsgStatus:
		return MsgStatus, true
	}
	return string(t), true
}
