package comfy

import (
	"encoding/json"
	"maps"
	"testing"
)

// parseNodeJSON is parseNode as it was, through encoding/json: the
// reference FuzzParseNode holds parseNode to.
func parseNodeJSON(b json.RawMessage) (Node, error) {
	var all map[string]json.RawMessage
	if err := json.Unmarshal(b, &all); err != nil || all == nil {
		return Node{}, errBadMetadata
	}
	var n Node
	if err := json.Unmarshal(all["class_type"], &n.ClassType); err != nil || n.ClassType == "" {
		return Node{}, errBadMetadata
	}
	if in, ok := all["inputs"]; ok && !isNull(in) {
		if err := json.Unmarshal(in, &n.Inputs); err != nil {
			return Node{}, err
		}
	}
	if n.Inputs == nil {
		n.Inputs = map[string]json.RawMessage{}
	}
	n.Meta = all["_meta"]
	for k, v := range all {
		switch k {
		case "class_type", "inputs", "_meta":
		default:
			if n.Extra == nil {
				n.Extra = map[string]json.RawMessage{}
			}
			n.Extra[k] = v
		}
	}
	return n, nil
}

func rawEqual(a, b map[string]json.RawMessage) bool {
	return maps.EqualFunc(a, b, func(x, y json.RawMessage) bool { return string(x) == string(y) })
}

// A node of a valid prompt reads as encoding/json reads it: the same
// class_type, inputs, _meta and other keys, or the same refusal.
func FuzzParseNode(f *testing.F) {
	for _, s := range []string{
		`{"class_type":"KSampler","inputs":{"seed":5,"model":["4",0],"name":"a.png"},"_meta":{"title":"K"}}`,
		`{"class_type":"SaveImage","inputs":{"images":["3",0]},"is_changed":["x"],"k":1}`,
		`{"class_type":"A","class_type":"B","inputs":{"x":1,"x":2},"inputs":{"y":3}}`,
		`{"class_type":"","inputs":{}}`,
		`{"class_type":null}`,
		`{"class_type":1}`,
		`{"class_type":"\u0000"}`,
		`{"class_type":"\ud800x","inputs":null,"_meta":null}`,
		`{"class_type":"A","inputs":[1]}`,
		`{"class_type":"A","inputs":"x"}`,
		`{"inputs":{}}`,
		`{"class_type":"A","in\u0070uts":{"a":1},"Inputs":{"b":2}," \xff":1}`,
		`null`, `[]`, `"x"`, `{}`,
		` { "class_type" : "A" , "inputs" : { "a" : [ "1" , 0 ] } } `,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if !json.Valid(in) {
			return // parseNode reads nodes of a body already checked
		}
		// parseNode gets a node as ObjectMembers cut it: no space around.
		v := skipSpace(in, 0)
		in = in[v:validValue(in, v, 0)]
		got, gerr := parseNode(in)
		want, werr := parseNodeJSON(in)
		if (gerr != nil) != (werr != nil) {
			t.Fatalf("%q: parseNode error %v, encoding/json's %v", in, gerr, werr)
		}
		if gerr != nil {
			return
		}
		if got.ClassType != want.ClassType || string(got.Meta) != string(want.Meta) ||
			!rawEqual(got.Inputs, want.Inputs) || !rawEqual(got.Extra, want.Extra) ||
			(got.Extra == nil) != (want.Extra == nil) || got.Inputs == nil {
			t.Fatalf("%q:\nparseNode      %#v\nencoding/json  %#v", in, got, want)
		}
	})
}
