package comfy

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// ObjectMembers agrees with encoding/json on every valid object: same keys,
// same values, and each value is the exact bytes of the input.
func checkMembers(t *testing.T, in []byte) {
	t.Helper()
	var want map[string]json.RawMessage
	isObject := json.Unmarshal(in, &want) == nil && want != nil
	ms, ok := ObjectMembers(in)
	if ok != isObject {
		t.Fatalf("%q: ObjectMembers ok=%v, encoding/json object=%v", in, ok, isObject)
	}
	if !ok {
		return
	}
	got := map[string]json.RawMessage{}
	for _, m := range ms {
		if !bytes.Contains(in, m.Value) {
			t.Fatalf("%q: value %q is not a slice of the input", in, m.Value)
		}
		got[m.Key] = m.Value // the last of a repeated key wins, as in encoding/json
	}
	for k, v := range got {
		var a, b any
		if json.Unmarshal(v, &a) != nil {
			t.Fatalf("%q: value %q of %q is not JSON", in, v, k)
		}
		if json.Unmarshal(want[k], &b) != nil || !reflect.DeepEqual(a, b) {
			t.Fatalf("%q: %q = %q, encoding/json says %q", in, k, v, want[k])
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%q: keys %v, want %v", in, got, want)
	}
}

func TestObjectMembers(t *testing.T) {
	for _, in := range []string{
		`{}`, ` { } `, `{"a":1}`, `{"a" : [1, {"b": "}]"}], "c\"d": "x\\"}`,
		`{"k": "\u00e9\"}", "n": -1.5e+3, "t": true, "f": false, "z": null}`,
		`{"nested": {"deep": [[[{}]]], "s": "[{"}, "after": 2}`,
		`{"a":1,"a":2}`, `[1,2]`, `"x"`, `null`, `3`,
		"{\"tab\":\t\"v\"\n,\r\"w\" :[ ]}",
	} {
		checkMembers(t, []byte(in))
	}
	if v, ok := ObjectMember([]byte(`{"id":"wf-1","nodes":[`+strings.Repeat(`{"x":1},`, 1000)+`{}]}`), "id"); !ok || string(v) != `"wf-1"` {
		t.Fatalf("ObjectMember id: %q %v", v, ok)
	}
	if _, ok := ObjectMember([]byte(`{"a":{"id":1}}`), "id"); ok {
		t.Fatal("ObjectMember found a nested key")
	}
}

func FuzzObjectMembers(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":[1,"]"],"b":{"c":"\\\""}}`, `{"a":1,"a":2}`, `[]`, `{"é":"\u0000"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if !json.Valid(in) {
			return // callers validate first
		}
		checkMembers(t, in)
	})
}

// The body sent upstream keeps every value the client sent byte for byte
// (no re-encoding of the workflow: "<" stays "<"), and is valid JSON.
func TestBodyKeepsValuesVerbatim(t *testing.T) {
	in := []byte(`{"client_id":"c","prompt":{"1":{"class_type":"SaveImage","inputs":{"filename_prefix":"a<b"}}},` +
		`"extra_data":{"extra_pnginfo":{"workflow":{"id":"w","note":"x < y & z",  "n":1.50}},"auth_token_comfy_org":"secret"},` +
		`"partial_execution_targets":["9"],"front":false}`)
	pr, berr := ParsePromptRequest(in)
	if berr != nil {
		t.Fatal(berr)
	}
	out, err := pr.Body("pid", "gw", SensitiveExtraData...)
	if err != nil || !json.Valid(out) {
		t.Fatalf("%s %v", out, err)
	}
	for _, want := range []string{`{"id":"w","note":"x < y & z",  "n":1.50}`, `"partial_execution_targets":["9"]`, `"front":false`, `"prompt_id":"pid"`, `"client_id":"gw"`} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("body lacks %s: %s", want, out)
		}
	}
	if bytes.Contains(out, []byte("secret")) {
		t.Errorf("body kept a credential: %s", out)
	}
}

func BenchmarkParseAndBody1MiB(b *testing.B) {
	wf := `{"id":"w","nodes":[` + strings.Repeat(`{"id":1,"type":"CLIPTextEncode","pos":[10,20],"widgets_values":["a photo of a cat, \"quoted\""]},`, 10000) + `{}]}`
	in := []byte(`{"client_id":"c","prompt":{"1":{"class_type":"SaveImage","inputs":{}}},"extra_data":{"extra_pnginfo":{"workflow":` + wf + `}}}`)
	b.SetBytes(int64(len(in)))
	for i := 0; i < b.N; i++ {
		pr, berr := ParsePromptRequest(in)
		if berr != nil {
			b.Fatal(berr)
		}
		if _, err := pr.Body("p", "c"); err != nil {
			b.Fatal(err)
		}
	}
}
