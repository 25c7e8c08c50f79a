package comfy

import (
	"encoding/json"
	"sort"
)

// A prompt body carries the UI workflow in extra_data — often megabytes of
// JSON the gateway never interprets. These helpers split and join JSON
// objects without decoding (or re-validating) their values, so that such a
// body is scanned once, and relayed byte for byte.

// Member is one key of a JSON object with its value as sent.
type Member struct {
	Key   string
	Value json.RawMessage
}

// ObjectMembers splits a JSON object into its members, in order, without
// copying or decoding the values. b must be valid JSON (json.Valid); ok is
// false when it is not an object.
func ObjectMembers(b []byte) (members []Member, ok bool) {
	ok = eachMember(b, func(k string, v json.RawMessage) bool {
		members = append(members, Member{k, v})
		return true
	})
	return members, ok
}

// ObjectMember returns the value of a key of a JSON object (its first
// occurrence), scanning no further than needed: for the frontend's
// workflow, whose "id" comes first, that is a few bytes of megabytes. b
// must be valid JSON.
func ObjectMember(b []byte, key string) (json.RawMessage, bool) {
	var found json.RawMessage
	eachMember(b, func(k string, v json.RawMessage) bool {
		if k == key {
			found = v
			return false
		}
		return true
	})
	return found, found != nil
}

// AppendObject appends a JSON object of the members of m, keys sorted, the
// values as they are (they must be valid JSON).
func AppendObject(dst []byte, m map[string]json.RawMessage) []byte {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	dst = append(dst, '{')
	for i, k := range keys {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = appendKey(dst, k)
		dst = append(dst, m[k]...)
	}
	return append(dst, '}')
}

// appendKey appends "key": (JSON-quoted).
func appendKey(dst []byte, k string) []byte {
	q, _ := json.Marshal(k)
	dst = append(dst, q...)
	return append(dst, ':')
}

// eachMember calls f for each member of the object b until f returns
// false. It reports false if b is not a well-formed object.
func eachMember(b []byte, f func(key string, value json.RawMessage) bool) bool {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return true
	}
	for {
		if i >= len(b) || b[i] != '"' {
			return false
		}
		e := endOfString(b, i)
		if e < 0 {
			return false
		}
		var key string
		if plainASCII(b[i+1 : e-1]) {
			key = string(b[i+1 : e-1])
		} else if json.Unmarshal(b[i:e], &key) != nil { // escapes, UTF-8 checks
			return false
		}
		i = skipSpace(b, e)
		if i >= len(b) || b[i] != ':' {
			return false
		}
		i = skipSpace(b, i+1)
		e = endOfValue(b, i)
		if e < 0 {
			return false
		}
		if !f(key, b[i:e:e]) {
			return true
		}
		i = skipSpace(b, e)
		if i >= len(b) {
			return false
		}
		switch b[i] {
		case ',':
			i = skipSpace(b, i+1)
		case '}':
			return true
		default:
			return false
		}
	}
}

// plainASCII reports whether a string's content needs no decoding.
func plainASCII(b []byte) bool {
	for _, c := range b {
		if c == '\\' || c >= 0x80 {
			return false
		}
	}
	return true
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// endOfString returns the index just past the string starting at b[i]
// ('"'), or -1.
func endOfString(b []byte, i int) int {
	for j := i + 1; j < len(b); j++ {
		switch b[j] {
		case '\\':
			j++
		case '"':
			return j + 1
		}
	}
	return -1
}

// endOfValue returns the index just past the value starting at b[i], or -1.
func endOfValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return endOfString(b, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(b); j++ {
			switch b[j] {
			case '"':
				e := endOfString(b, j)
				if e < 0 {
					return -1
				}
				j = e - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	default:
		j := i
		for j < len(b) {
			switch b[j] {
			case ' ', '\t', '\r', '\n', ',', '}', ']':
				return j
			}
			j++
		}
		return j
	}
}

// ValueFrom returns b from the start of the value of key (its first
// occurrence in the object b) to the end of b, without finding where that
// value ends: for the value's own first members (the frontend's workflow
// "id") read a few bytes of a megabyte. Values before key are skipped. b
// must be valid JSON.
func ValueFrom(b []byte, key string) ([]byte, bool) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return nil, false
	}
	i = skipSpace(b, i+1)
	for i < len(b) && b[i] == '"' {
		e := endOfString(b, i)
		if e < 0 {
			return nil, false
		}
		k, ok := decodeKey(b[i:e])
		if !ok {
			return nil, false
		}
		i = skipSpace(b, e)
		if i >= len(b) || b[i] != ':' {
			return nil, false
		}
		i = skipSpace(b, i+1)
		if k == key {
			return b[i:], i < len(b)
		}
		if i = endOfValue(b, i); i < 0 {
			return nil, false
		}
		i = skipSpace(b, i)
		if i >= len(b) || b[i] != ',' {
			return nil, false
		}
		i = skipSpace(b, i+1)
	}
	return nil, false
}
