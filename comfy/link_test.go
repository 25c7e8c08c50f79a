package comfy

import (
	"encoding/json"
	"testing"
)

// linkSourceDecoded is what LinkSource replaced: the input decoded whole.
func linkSourceDecoded(raw []byte) (string, bool) {
	var link []json.RawMessage
	if json.Unmarshal(raw, &link) != nil || len(link) != 2 {
		return "", false
	}
	var src string
	if json.Unmarshal(link[0], &src) != nil {
		return "", false
	}
	return src, true
}

// FuzzLinkSource checks LinkSource against decoding the input whole, for
// any input value (inputs reach it as valid JSON).
func FuzzLinkSource(f *testing.F) {
	for _, s := range []string{`["4", 0]`, ` [ "4" , 1 ] `, `["4"]`, `["4",0,1]`, `[4,0]`, `"4"`, `["\u00e9\ud800",{"a":[]}]`, `[]`, `[[],0]`, `null`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if !json.Valid(in) {
			return
		}
		src, ok := LinkSource(in)
		wsrc, wok := linkSourceDecoded(in)
		if ok != wok || src != wsrc {
			t.Fatalf("LinkSource(%q) = %q, %v; decoding it whole: %q, %v", in, src, ok, wsrc, wok)
		}
	})
}
