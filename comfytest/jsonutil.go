package comfytest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"
)

// kv is one member of an ordered JSON object.
type kv struct {
	K string
	V any
}

// obj is a JSON object that keeps its key order, like a Python dict. The
// fake builds every message with obj so that the field order on the wire is
// the one ComfyUI uses, and it decodes client JSON into obj so that prompts
// and extra_data are echoed back (in /queue, /history, /api/jobs) in the
// order the client sent them.
type obj []kv

func (o obj) get(k string) (any, bool) {
	for _, e := range o {
		if e.K == k {
			return e.V, true
		}
	}
	return nil, false
}

func (o obj) has(k string) bool {
	_, ok := o.get(k)
	return ok
}

// set replaces the value of k in place or appends k (Python dict semantics).
func (o obj) set(k string, v any) obj {
	for i := range o {
		if o[i].K == k {
			o[i].V = v
			return o
		}
	}
	return append(o, kv{k, v})
}

func (o obj) del(k string) obj {
	for i := range o {
		if o[i].K == k {
			return append(o[:i:i], o[i+1:]...)
		}
	}
	return o
}

func (o obj) clone() obj {
	if o == nil {
		return nil
	}
	c := make(obj, len(o))
	copy(c, o)
	return c
}

func (o obj) MarshalJSON() ([]byte, error) { return appendJSON(nil, o) }

// marshalJSON encodes v without HTML escaping and without the trailing
// newline of json.Encoder.
func marshalJSON(v any) ([]byte, error) { return appendJSON(make([]byte, 0, 256), v) }

// appendJSON appends v's JSON to b: what json.Encoder with SetEscapeHTML
// (false) writes, minus its newline. The types every message is made of are
// written directly (nested objects are not re-validated and re-compacted at
// each level, as the encoder does with a MarshalJSON result); others go
// through the encoder.
func appendJSON(b []byte, v any) ([]byte, error) {
	switch v := v.(type) {
	case obj:
		b = append(b, '{')
		for i, e := range v {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, e.K)
			b = append(b, ':')
			var err error
			if b, err = appendJSON(b, e.V); err != nil {
				return nil, err
			}
		}
		return append(b, '}'), nil
	case []any:
		if v == nil {
			return append(b, "null"...), nil
		}
		b = append(b, '[')
		for i, e := range v {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendJSON(b, e); err != nil {
				return nil, err
			}
		}
		return append(b, ']'), nil
	case string:
		return appendJSONString(b, v), nil
	case int:
		return strconv.AppendInt(b, int64(v), 10), nil
	case int64:
		return strconv.AppendInt(b, v, 10), nil
	case bool:
		return strconv.AppendBool(b, v), nil
	case nil:
		return append(b, "null"...), nil
	case pyNum:
		return append(b, v.String()...), nil
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return append(b, bytes.TrimRight(buf.Bytes(), "\n")...), nil
}

// appendJSONString quotes s as json.Encoder does without HTML escaping:
// plain printable ASCII directly, anything else through the encoder.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= utf8.RuneSelf || c == '"' || c == '\\' {
			var buf bytes.Buffer
			enc := json.NewEncoder(&buf)
			enc.SetEscapeHTML(false)
			_ = enc.Encode(s) // a string always encodes
			return append(b, bytes.TrimRight(buf.Bytes(), "\n")...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

func mustJSON(v any) []byte {
	b, err := marshalJSON(v)
	if err != nil {
		panic(fmt.Sprintf("comfytest: cannot marshal %T: %v", v, err))
	}
	return b
}

// asciiJSON is mustJSON with every non-ASCII rune escaped as \uXXXX, like
// Python's json.dumps (ensure_ascii=True). Used for PNG text chunks.
func asciiJSON(v any) []byte {
	b := mustJSON(v)
	var out bytes.Buffer
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		if r < utf8.RuneSelf {
			out.WriteByte(b[0])
		} else if r > 0xFFFF {
			r -= 0x10000
			fmt.Fprintf(&out, `\u%04x\u%04x`, 0xD800+(r>>10), 0xDC00+(r&0x3FF))
		} else {
			fmt.Fprintf(&out, `\u%04x`, r)
		}
		b = b[size:]
	}
	return out.Bytes()
}

var errTrailingData = errors.New("extra data after JSON value")

// decodeOrdered parses JSON into obj / []any / string / json.Number / bool /
// nil, keeping object key order.
func decodeOrdered(data []byte) (any, error) {
	if json.Valid(data) {
		p := orderedParser{data: data}
		return p.value(), nil
	}
	return decodeOrderedTokens(data) // for its error
}

// orderedParser reads JSON that json.Valid accepted, producing what
// decodeOrderedTokens would (about 20 times faster: a 1 MiB UI workflow in
// a POST /prompt takes milliseconds instead of a large part of a second).
type orderedParser struct {
	data []byte
	i    int
}

func (p *orderedParser) space() {
	for p.i < len(p.data) {
		switch p.data[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

func (p *orderedParser) value() any {
	p.space()
	switch c := p.data[p.i]; c {
	case '{':
		p.i++
		o := obj{}
		p.space()
		if p.data[p.i] == '}' {
			p.i++
			return o
		}
		for {
			p.space()
			k := p.string()
			p.space()
			p.i++ // ':'
			o = o.set(k, p.value())
			p.space()
			c := p.data[p.i]
			p.i++
			if c == '}' {
				return o
			}
		}
	case '[':
		p.i++
		arr := []any{}
		p.space()
		if p.data[p.i] == ']' {
			p.i++
			return arr
		}
		for {
			arr = append(arr, p.value())
			p.space()
			c := p.data[p.i]
			p.i++
			if c == ']' {
				return arr
			}
		}
	case '"':
		return p.string()
	case 't':
		p.i += 4
		return true
	case 'f':
		p.i += 5
		return false
	case 'n':
		p.i += 4
		return nil
	}
	start := p.i
	for p.i < len(p.data) && strings.IndexByte("+-.0123456789eE", p.data[p.i]) >= 0 {
		p.i++
	}
	return json.Number(p.data[start:p.i])
}

// string reads a string token; one with escapes or non-ASCII bytes is
// decoded by encoding/json (invalid UTF-8 becomes U+FFFD there).
func (p *orderedParser) string() string {
	start := p.i
	p.i++
	plain := true
	for {
		c := p.data[p.i]
		if c == '"' {
			break
		}
		if c == '\\' {
			plain = false
			p.i++
		} else if c >= utf8.RuneSelf {
			plain = false
		}
		p.i++
	}
	p.i++
	if plain {
		return string(p.data[start+1 : p.i-1])
	}
	var s string
	_ = json.Unmarshal(p.data[start:p.i], &s)
	return s
}

// decodeOrderedTokens is decodeOrdered with encoding/json's tokenizer; its
// errors are the ones the fake reports for invalid JSON.
func decodeOrderedTokens(data []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	v, err := readOrdered(dec)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errTrailingData
	}
	return v, nil
}

func readOrdered(dec *json.Decoder) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return tok, nil
	}
	switch d {
	case '{':
		o := obj{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return nil, err
			}
			key, ok := kt.(string)
			if !ok {
				return nil, fmt.Errorf("bad object key %v", kt)
			}
			v, err := readOrdered(dec)
			if err != nil {
				return nil, err
			}
			o = o.set(key, v)
		}
		if _, err := dec.Token(); err != nil {
			return nil, err
		}
		return o, nil
	case '[':
		arr := []any{}
		for dec.More() {
			v, err := readOrdered(dec)
			if err != nil {
				return nil, err
			}
			arr = append(arr, v)
		}
		if _, err := dec.Token(); err != nil {
			return nil, err
		}
		return arr, nil
	}
	return nil, fmt.Errorf("unexpected delimiter %v", d)
}

// toPlain converts an ordered value into what encoding/json would have
// produced with a plain Unmarshal into any (maps, float64 numbers).
func toPlain(v any) any {
	switch t := v.(type) {
	case obj:
		m := make(map[string]any, len(t))
		for _, e := range t {
			m[e.K] = toPlain(e.V)
		}
		return m
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = toPlain(e)
		}
		return out
	case json.Number:
		f, err := t.Float64()
		if err != nil {
			return t.String()
		}
		return f
	}
	return v
}

// pyNum is a number that prints the way Python's json module prints an int
// or a float (5 vs 5.0).
type pyNum struct {
	f       float64
	isFloat bool
}

func intNum(i int64) pyNum { return pyNum{f: float64(i)} }

func (n pyNum) MarshalJSON() ([]byte, error) { return []byte(n.String()), nil }

func (n pyNum) String() string {
	if !n.isFloat {
		return strconv.FormatInt(int64(n.f), 10)
	}
	return pyFloat(n.f)
}

// pyFloat formats like Python's repr(float).
func pyFloat(f float64) string {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return "null"
	}
	a := math.Abs(f)
	if f != 0 && (a >= 1e16 || a < 1e-4) {
		s := strconv.FormatFloat(f, 'e', -1, 64)
		// Go: 1e+16, 1.5e-05; Python: 1e+16, 1.5e-05 — same shape.
		return s
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.ContainsAny(s, ".e") {
		s += ".0"
	}
	return s
}

// pyStr renders a JSON-decoded value the way Python's str() would.
func pyStr(v any) string {
	switch t := v.(type) {
	case nil:
		return "None"
	case string:
		return t
	case bool:
		if t {
			return "True"
		}
		return "False"
	case json.Number:
		if _, err := t.Int64(); err == nil {
			return t.String()
		}
		if f, err := t.Float64(); err == nil {
			if !strings.ContainsAny(t.String(), ".eE") {
				return t.String()
			}
			return pyFloat(f)
		}
		return t.String()
	case pyNum:
		return t.String()
	case int:
		return strconv.Itoa(t)
	case int64:
		return strconv.FormatInt(t, 10)
	case float64:
		return pyFloat(t)
	}
	return string(mustJSON(v))
}
