package comfy

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// The one-pass check of a prompt body accepts exactly what json.Valid
// accepts, and splits it as encoding/json would.
func checkSplit(t *testing.T, in []byte) {
	t.Helper()
	v := skipSpace(in, 0)
	end := validValue(in, v, 0)
	ours := end >= 0 && skipSpace(in, end) == len(in)
	if want := json.Valid(in); ours != want {
		t.Fatalf("%q: valid = %v, json.Valid = %v", in, ours, want)
	}
	raw, extra, _, ok := splitPromptBody(in, MaxPromptKeys)
	var want map[string]json.RawMessage
	isObject := json.Unmarshal(in, &want) == nil && want != nil
	if ok != isObject {
		t.Fatalf("%q: split ok = %v, encoding/json object = %v", in, ok, isObject)
	}
	if !ok {
		return
	}
	if len(raw) != len(want) {
		t.Fatalf("%q: %d keys, want %d", in, len(raw), len(want))
	}
	for k, v := range want {
		if !bytes.Equal(bytes.TrimSpace(raw[k]), bytes.TrimSpace(v)) {
			t.Fatalf("%q: %q = %q, want %q", in, k, raw[k], v)
		}
	}
	var ed map[string]json.RawMessage
	isExtra := json.Unmarshal(want["extra_data"], &ed) == nil && ed != nil
	if (extra != nil) != isExtra {
		t.Fatalf("%q: extra_data members %v, encoding/json object = %v", in, extra, isExtra)
	}
	got := map[string]json.RawMessage{}
	for _, m := range extra {
		got[m.Key] = m.Value
	}
	for k, v := range ed {
		if !bytes.Equal(got[k], v) {
			t.Fatalf("%q: extra_data %q = %q, want %q", in, k, got[k], v)
		}
	}
}

var splitSeeds = []string{
	`{}`, ` {} `, `[]`, `[[]]`, `[{}]`, `{"a":{}}`, `{"a":[]}`, `{"a":[{},[],{"b":[1,2,{"c":null}]}]}`,
	`{"prompt":{"1":{"class_type":"X","inputs":{}}},"extra_data":{"extra_pnginfo":{"workflow":{"id":"w"}}}}`,
	`{"extra_data":{"a":1},"extra_data":null}`, `{"extra_data":null,"extra_data":{"a":1}}`, `{"extra_data":{}}`,
	`{"extra_data":7}`, `{"a":"\u00e9\"\\\/\b\f\n\r\t"}`, `{"a":"\u12"}`, `{"a":"\x"}`, "{\"a\":\"\x01\"}",
	`{"a":-0.5e+10,"b":0,"c":-1,"d":1E5,"e":10.25}`, `{"a":01}`, `{"a":1.}`, `{"a":-}`, `{"a":1e}`, `{"a":.5}`,
	`{"a":true,"b":false,"c":null}`, `{"a":tru}`, `{"a":nul}`, `{"a":1,}`, `{,}`, `{"a"}`, `{"a":}`, `{"a" 1}`,
	`[1,]`, `[,1]`, `[1 2]`, `{"a":1}}`, `{"a":1} x`, `{"a":[1}`, `{"a":{1}}`, `"x"`, `1`, `null`, ``, ` `,
	"{\"\xff\":\"\xfe\"}", `{"é":"ü"}`, "{\t\"a\"\n:\r[ 1 , 2 ]\n}",
	strings.Repeat("[", 10001) + strings.Repeat("]", 10001), strings.Repeat("[", 10000) + strings.Repeat("]", 10000),
	// The nesting limit counts the body's own object and extra_data.
	`{"a":` + strings.Repeat("[", 9999) + strings.Repeat("]", 9999) + `}`, `{"a":` + strings.Repeat("[", 10000) + strings.Repeat("]", 10000) + `}`,
	`{"extra_data":{"a":` + strings.Repeat("[", 9998) + strings.Repeat("]", 9998) + `}}`,
	`{"extra_data":{"a":` + strings.Repeat("[", 9999) + strings.Repeat("]", 9999) + `}}`,
}

func TestSplitPromptBody(t *testing.T) {
	for _, s := range splitSeeds {
		checkSplit(t, []byte(s))
	}
}

func FuzzSplitPromptBody(f *testing.F) {
	for _, s := range splitSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		checkSplit(t, in)
	})
}

// Whatever body is accepted, the body sent upstream is valid JSON.
func FuzzParsePromptRequest(f *testing.F) {
	for _, s := range splitSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte(`{"prompt":{"1":{"class_type":"SaveImage","inputs":{"images":["2",0]},"_meta":{"title":"x"},"k":1}},"extra_data":{"extra_pnginfo":{"workflow":{"id":"w"}},"auth_token_comfy_org":"s"},"front":true,"number":3}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		pr, berr := ParsePromptRequest(in)
		if berr != nil {
			return
		}
		if !json.Valid(in) {
			t.Fatalf("%q: accepted but not valid JSON", in)
		}
		out, err := pr.Body("p", "c", SensitiveExtraData...)
		if err == nil && !json.Valid(out) {
			t.Fatalf("%q: body sent upstream is not JSON: %q", in, out)
		}
	})
}

// ValueFrom starts where ObjectMember's value starts.
func checkValueFrom(t *testing.T, in []byte, key string) {
	t.Helper()
	if !json.Valid(in) {
		return // callers validate first
	}
	want, wok := ObjectMember(in, key)
	got, ok := ValueFrom(in, key)
	if ok != wok || (ok && !bytes.HasPrefix(got, want)) {
		t.Fatalf("%q: ValueFrom(%q) = %q %v, ObjectMember = %q %v", in, key, got, ok, want, wok)
	}
}

func TestValueFrom(t *testing.T) {
	wf := []byte(`{"workflow" : {"id":"w-1","nodes":[` + strings.Repeat(`{"x":"}"},`, 100) + `{}]}, "z":1}`)
	got, ok := ValueFrom(wf, "workflow")
	if !ok || !bytes.HasPrefix(got, []byte(`{"id":"w-1",`)) {
		t.Fatalf("ValueFrom(workflow) = %.20q %v", got, ok)
	}
	for _, s := range []string{`{"a":1,"workflow":{"id":2}}`, `{"a":[1,{"workflow":3}]}`, `{}`, `[]`, `{"w\u006frkflow":1}`} {
		checkValueFrom(t, []byte(s), "workflow")
	}
}

func FuzzValueFrom(f *testing.F) {
	f.Add([]byte(`{"a":1,"workflow":{"id":2}}`), "workflow")
	f.Add([]byte(`{"a":{"id":1},"id":"x"}`), "id")
	f.Fuzz(func(t *testing.T, in []byte, key string) {
		checkValueFrom(t, in, key)
	})
}
