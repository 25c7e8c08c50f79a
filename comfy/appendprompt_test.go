package comfy

import (
	"bytes"
	"encoding/json"
	"testing"
)

// refNode is a Node written as it was with maps and json.Marshal.
type refNode Node

func (n refNode) MarshalJSON() ([]byte, error) {
	m := make(map[string]json.RawMessage, 3+len(n.Extra))
	for k, v := range n.Extra {
		m[k] = v
	}
	ct, _ := json.Marshal(n.ClassType)
	m["class_type"] = ct
	in, err := json.Marshal(n.Inputs)
	if err != nil {
		return nil, err
	}
	m["inputs"] = in
	if len(n.Meta) > 0 {
		m["_meta"] = n.Meta
	}
	return json.Marshal(m)
}

// A prompt is written byte for byte as json.Marshal wrote it with maps
// (sorted keys, compacted values, <, > and & escaped), and refused where
// it refused: for prompts as a client sends them, and for nodes the
// gateway changed with any class_type, key or value.
func FuzzAppendPrompt(f *testing.F) {
	f.Add([]byte(`{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"color":0}},"2":{"class_type":"KSampler","inputs":{"model":["1", 0], "seed": 1e3},"_meta":{"title":"<b>"}}}}`),
		"CLIPTextEncode", "text", []byte(` "a\u2028 & b" `), "extra")
	f.Add([]byte(`{"prompt":{"9":{"class_type":"X","inputs":null,"is_changed":[1],"_meta":null}}}`), "\x00é<", "_meta", []byte(`{"a" : [ 1 , 2 ]}`), "class_type")
	f.Add([]byte(`{"prompt":{}}`), "", "", []byte(``), "inputs")
	f.Add([]byte(`{"prompt":{"a\"b":{"class_type":"\u00e9"}}}`), "x", "k", []byte(`[1,`), "_meta")
	f.Fuzz(func(t *testing.T, body []byte, class, key string, value []byte, extraKey string) {
		pr, err := ParsePromptRequest(body)
		if err != nil {
			return
		}
		check := func(prompt map[string]Node) {
			t.Helper()
			ref := make(map[string]refNode, len(prompt))
			for id, n := range prompt {
				ref[id] = refNode(n)
			}
			want, werr := json.Marshal(ref)
			got, gerr := AppendPrompt(nil, prompt)
			if (werr == nil) != (gerr == nil) || !bytes.Equal(got, want) {
				t.Fatalf("wrote %q (%v), json.Marshal writes %q (%v)", got, gerr, want, werr)
			}
		}
		check(pr.Prompt)
		// The gateway's changes: a node with any class, key and value.
		n := Node{ClassType: class, Inputs: map[string]json.RawMessage{key: value}, Extra: map[string]json.RawMessage{extraKey: value}}
		if len(value)%2 == 0 {
			n.Meta = value
		}
		pr.Prompt[key] = n
		check(pr.Prompt)
	})
}
