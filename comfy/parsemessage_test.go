package comfy

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// A text frame parses as encoding/json reads it into a Message, keys as
// ComfyUI sends them: the same type and data bytes, and refused where it
// refuses or the type is missing.
func FuzzParseMessage(f *testing.F) {
	f.Add([]byte(`{"type": "executed", "data": {"node": "9", "output": {"images": []}, "prompt_id": "p"}}`))
	f.Add([]byte(` {"data":null,"type":"execution_start","type":null} `))
	f.Add([]byte(`{"typ\u0065":"x\n","data":[1, 2],"data":"s"}`))
	f.Add([]byte(`{"type":3}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"type":"a"}x`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var want Message
		werr := json.Unmarshal(b, &want)
		if werr == nil && want.Type == "" {
			werr = errMissingType
		}
		var keys map[string]json.RawMessage
		if json.Unmarshal(b, &keys) == nil {
			for k := range keys {
				if k != "type" && k != "data" && (strings.EqualFold(k, "type") || strings.EqualFold(k, "data")) {
					return // a key encoding/json folds to a name; ComfyUI sends none
				}
			}
		}
		got, gerr := ParseMessage(b)
		if (gerr == nil) != (werr == nil) || gerr == nil && (got.Type != want.Type || !bytes.Equal(got.Data, want.Data)) {
			t.Fatalf("%q: parsed %q %q (%v), encoding/json reads %q %q (%v)", b, got.Type, got.Data, gerr, want.Type, want.Data, werr)
		}
	})
}

// A message is encoded byte for byte as json.Marshal wrote it.
func FuzzEncodeMessage(f *testing.F) {
	f.Add("status", []byte(`{"status": {"exec_info": {"queue_remaining": 0}}, "sid": "<a>"}`))
	f.Add("x\u2028\"", []byte(``))
	f.Add("", []byte(`[1,`))
	f.Fuzz(func(t *testing.T, typ string, data []byte) {
		m := Message{Type: typ, Data: data}
		ref := m
		if len(ref.Data) == 0 {
			ref.Data = json.RawMessage("{}")
		}
		want, _ := json.Marshal(ref)
		if got := m.Encode(); !bytes.Equal(got, want) {
			t.Fatalf("encoded %q, json.Marshal writes %q", got, want)
		}
	})
}

// A status message's data is what json.Marshal writes of StatusData.
func FuzzStatusMessage(f *testing.F) {
	f.Add(3, "")
	f.Add(-1, "abc<>\x00é")
	f.Fuzz(func(t *testing.T, n int, sid string) {
		var s StatusData
		s.Status.ExecInfo.QueueRemaining = n
		s.SID = sid
		want, _ := json.Marshal(s)
		if m := StatusMessage(n, sid); m.Type != MsgStatus || !bytes.Equal(m.Data, want) {
			t.Fatalf("status %d %q: %q, json.Marshal writes %q", n, sid, m.Data, want)
		}
	})
}
