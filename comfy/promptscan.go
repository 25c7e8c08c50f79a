package comfy

import "encoding/json"

// A POST /prompt body is megabytes of UI workflow around a small prompt.
// It is checked and split in one pass over its bytes: the validating
// primitives of rawjson.go find the end of each value while checking it as
// json.Valid would, so the body needs no separate validation pass, and
// nothing is decoded but the keys.

// splitPromptBody checks that body is one valid JSON object (as json.Valid
// would) and splits it into its top-level members and those of its
// extra_data object, in one pass. extra is nil when the last extra_data
// is missing or not an object. ok is false if body is not a valid object,
// or if it has more than maxKeys keys (its own and extra_data's, counted
// as they come: keys then says so).
func splitPromptBody(body []byte, maxKeys int) (raw map[string]json.RawMessage, extra []Member, keys int, ok bool) {
	raw = make(map[string]json.RawMessage, 8)
	end := walkObject(body, skipSpace(body, 0), 0, func(k []byte, at int) int {
		if keys++; keys > maxKeys {
			return stop
		}
		key := unquote(k)
		var e int
		if key == "extra_data" && body[at] == '{' {
			ms := []Member{} // not nil: an empty object is an object
			e = walkObject(body, at, 1, func(k []byte, at int) int {
				if keys++; keys > maxKeys {
					return stop
				}
				e := validValue(body, at, 2)
				if e >= 0 {
					ms = append(ms, Member{unquote(k), body[at:e:e]})
				}
				return e
			})
			extra = ms
		} else {
			e = validValue(body, at, 1)
			if key == "extra_data" {
				extra = nil
			}
		}
		if e >= 0 {
			raw[key] = body[at:e:e] // the last of a repeated key, like json.Unmarshal
		}
		return e
	})
	if end < 0 || skipSpace(body, end) != len(body) {
		return nil, nil, keys, false
	}
	return raw, extra, keys, true
}

// promptKeys counts the keys of a prompt (valid JSON) that decoding it
// makes: its nodes, each node's own and those of each node's inputs. It
// stops counting past max.
func promptKeys(p []byte, max int) int {
	n := 0
	walkObject(p, skipSpace(p, 0), 0, func(_ []byte, at int) int {
		if n++; n > max {
			return stop
		}
		if p[at] != '{' {
			return validValue(p, at, 1)
		}
		return walkObject(p, at, 1, func(k []byte, at int) int {
			if n++; n > max {
				return stop
			}
			if p[at] != '{' || !keyIs(k, "inputs") {
				return validValue(p, at, 2)
			}
			return walkObject(p, at, 2, func(_ []byte, at int) int {
				if n++; n > max {
					return stop
				}
				return validValue(p, at, 3)
			})
		})
	})
	return n
}
