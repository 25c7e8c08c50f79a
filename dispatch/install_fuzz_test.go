package dispatch

import (
	"bytes"
	"slices"
	"testing"
)

// An endpoint's /object_info, whatever it says, is read without a panic,
// and what is kept of it in the store reads back the same: every class,
// every COMBO input and its values, in order.
func FuzzObjectInfoKept(f *testing.F) {
	f.Add([]byte(`{"CheckpointLoaderSimple":{"input":{"required":{"ckpt_name":[["a.safetensors","b.safetensors"],{}]}}},"KSampler":{"input":{"required":{"seed":["INT",{}],"sampler_name":[["euler","dpmpp_2m"]]}}}}`))
	f.Add([]byte(`{"X":{"input":{"optional":{"m":["COMBO",{"options":["x","y"]}]},"required":{"n":[["x","y"]]}}}}`))
	f.Add([]byte(`{"X":{"input":{"required":{"m":[[]]}}},"Y":{}}`))
	f.Add([]byte(`{"X":{"input":{"required":{"m":[["a\u0000b","a"],"b"]}}}}`))
	f.Add([]byte(`{"X":{"input":{"required":{"m":[["a"],["b"]]}}}`))
	f.Add([]byte(`{"X":{"input":{"required":{"m":[["a\u0000b"]]}}},"Y":{"input":{"required":{"m":[["a","b"]]}}}}`))
	f.Add([]byte(`[1,2]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		classes, err := parseObjectInfo(bytes.NewReader(b))
		if err != nil {
			return
		}
		enc, err := encodeInstall(classes)
		if err != nil {
			if err != errInstallTooBig {
				t.Fatalf("encode: %v", err)
			}
			return
		}
		back, err := decodeInstall(enc)
		if err != nil {
			t.Fatalf("decode: %v (%s)", err, enc)
		}
		if len(back) != len(classes) {
			t.Fatalf("%d classes back, want %d", len(back), len(classes))
		}
		for name, ci := range classes {
			bi, ok := back[name]
			if !ok || len(bi.combos) != len(ci.combos) {
				t.Fatalf("class %q: %v, want %v", name, bi, ci)
			}
			for in, c := range ci.combos {
				if !slices.Equal(bi.combos[in].list, c.list) {
					t.Fatalf("class %q input %q: %q, want %q", name, in, bi.combos[in].list, c.list)
				}
				for _, v := range c.list {
					if !bi.combos[in].has(v) {
						t.Fatalf("class %q input %q lost %q", name, in, v)
					}
				}
			}
		}
	})
}

// What the store hands back is not trusted either: a stored install that
// is not one is refused, never a panic.
func FuzzDecodeInstall(f *testing.F) {
	f.Add([]byte(`{"lists":[["a","b"]],"classes":{"X":{"m":0}}}`))
	f.Add([]byte(`{"lists":[],"classes":{"X":{"m":3}}}`))
	f.Add([]byte(`{"lists":[["a"]],"classes":{"X":{"m":-1}}}`))
	f.Add([]byte(`{"lists":null,"classes":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		classes, err := decodeInstall(b)
		if err != nil {
			return
		}
		for _, ci := range classes {
			for _, c := range ci.combos {
				for _, v := range c.list {
					if !c.has(v) {
						t.Fatalf("combo lost %q", v)
					}
				}
			}
		}
	})
}
