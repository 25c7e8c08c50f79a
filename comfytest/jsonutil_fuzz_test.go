package comfytest

import (
	"reflect"
	"testing"
)

// The fast ordered decoder gives exactly what the tokenizer-based one
// gives, for valid and invalid input alike.
func FuzzDecodeOrdered(f *testing.F) {
	for _, s := range []string{
		`{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "color": 1.5e3}}}, "client_id": "x"}`,
		` [1, -2.5, 3e-7, true, false, null, "a\"b\\c\u00e9\ud83d\ude00", {}, []] `,
		`{"k": 1, "j": 2, "k": 3}`,
		"{\"bad\xff utf8\": \"\xfe\"}",
		`"caf` + "\u00e9" + `"`,
		`{"a": [1, 2,]}`,
		`{"a" 1}`,
		`[1] [2]`,
		``,
		`0`,
		"\t{ }\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		got, err := decodeOrdered(data)
		want, werr := decodeOrderedTokens(data)
		if (err == nil) != (werr == nil) {
			t.Fatalf("%q: error %v, tokenizer %v", data, err, werr)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%q:\n got %#v\nwant %#v", data, got, want)
		}
	})
}
