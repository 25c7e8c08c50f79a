package comfy

import (
	"bytes"
	"encoding/binary"
)

// Binary frame event types (the first 4 bytes, big-endian, of every binary
// WebSocket frame).
const (
	BinaryPreviewImage             uint32 = 1
	BinaryText                     uint32 = 3
	BinaryPreviewImageWithMetadata uint32 = 4
)

// Image formats of a type-1 preview frame.
const (
	ImageJPEG uint32 = 1
	ImagePNG  uint32 = 2
)

// BinaryType returns the event type of a binary frame.
func BinaryType(frame []byte) (uint32, bool) {
	if len(frame) < 4 {
		return 0, false
	}
	return binary.BigEndian.Uint32(frame), true
}

// PreviewMetadata is the JSON header of a type-4 preview frame.
type PreviewMetadata struct {
	NodeID        string  `json:"node_id"`
	PromptID      string  `json:"prompt_id"`
	DisplayNodeID string  `json:"display_node_id"`
	ParentNodeID  *string `json:"parent_node_id"`
	RealNodeID    string  `json:"real_node_id"`
	ImageType     string  `json:"image_type"`
}

// Preview is a decoded preview frame of type 1 or 4.
type Preview struct {
	// Metadata is nil for a type-1 frame.
	Metadata *PreviewMetadata
	// ImageType is "image/jpeg" or "image/png".
	ImageType string
	// Image holds the encoded image bytes; it aliases the frame.
	Image []byte
}

// Clone returns a copy of p with an image of its own (Image no longer
// aliases the frame it was read from).
func (p *Preview) Clone() *Preview {
	c := *p
	c.Image = bytes.Clone(p.Image)
	return &c
}

// ParsePreview decodes a type-1 or type-4 preview frame.
func ParsePreview(frame []byte) (Preview, error) {
	t, ok := BinaryType(frame)
	if !ok || len(frame) < 8 {
		return Preview{}, errShortFrame
	}
	second := binary.BigEndian.Uint32(frame[4:8])
	switch t {
	case BinaryPreviewImage:
		it := "image/jpeg"
		if second == ImagePNG {
			it = "image/png"
		}
		return Preview{ImageType: it, Image: frame[8:]}, nil
	case BinaryPreviewImageWithMetadata:
		if uint64(second) > uint64(len(frame)-8) {
			return Preview{}, errShortFrame
		}
		md, ok := parsePreviewMetadata(frame[8 : 8+second])
		if !ok {
			return Preview{}, errBadMetadata
		}
		it := md.ImageType
		if it == "" {
			it = "image/png"
		}
		return Preview{Metadata: &md, ImageType: it, Image: frame[8+second:]}, nil
	}
	return Preview{}, errBadMetadata
}

// EncodeType1 builds a type-1 preview frame (no metadata).
func (p Preview) EncodeType1() []byte {
	return append(p.AppendType1Head(make([]byte, 0, 8+len(p.Image))), p.Image...)
}

// AppendType1Head appends what comes before the image in a type-1 frame.
func (p Preview) AppendType1Head(dst []byte) []byte {
	format := ImageJPEG
	if p.ImageType == "image/png" {
		format = ImagePNG
	}
	dst = binary.BigEndian.AppendUint32(dst, BinaryPreviewImage)
	return binary.BigEndian.AppendUint32(dst, format)
}

// EncodeType4 builds a type-4 preview frame carrying md.
func (p Preview) EncodeType4(md PreviewMetadata) []byte {
	head := p.AppendType4Head(nil, md)
	return append(append(make([]byte, 0, len(head)+len(p.Image)), head...), p.Image...)
}

// AppendType4Head appends what comes before the image in a type-4 frame
// carrying md (written as json.Marshal writes it): a writer can send it
// and the image without joining them.
func (p Preview) AppendType4Head(dst []byte, md PreviewMetadata) []byte {
	if md.ImageType == "" {
		md.ImageType = p.ImageType
	}
	dst = binary.BigEndian.AppendUint32(dst, BinaryPreviewImageWithMetadata)
	at := len(dst)
	dst = binary.BigEndian.AppendUint32(dst, 0)
	dst = append(dst, `{"node_id":`...)
	dst = appendMarshaledString(dst, md.NodeID)
	dst = append(dst, `,"prompt_id":`...)
	dst = appendMarshaledString(dst, md.PromptID)
	dst = append(dst, `,"display_node_id":`...)
	dst = appendMarshaledString(dst, md.DisplayNodeID)
	dst = append(dst, `,"parent_node_id":`...)
	if md.ParentNodeID == nil {
		dst = append(dst, "null"...)
	} else {
		dst = appendMarshaledString(dst, *md.ParentNodeID)
	}
	dst = append(dst, `,"real_node_id":`...)
	dst = appendMarshaledString(dst, md.RealNodeID)
	dst = append(dst, `,"image_type":`...)
	dst = appendMarshaledString(dst, md.ImageType)
	dst = append(dst, '}')
	binary.BigEndian.PutUint32(dst[at:], uint32(len(dst)-at-4))
	return dst
}

// parsePreviewMetadata reads a type-4 frame's metadata: one JSON object
// (space around it allowed) whose members of PreviewMetadata's names are
// strings (parent_node_id also null; null leaves a string empty), other
// members anything; the last of a name wins. It reads what
// encoding/json would, keys as ComfyUI sends them, without reflection:
// previews come at every few sampler steps of every job.
func parsePreviewMetadata(b []byte) (md PreviewMetadata, ok bool) {
	e := walkObject(b, skipSpace(b, 0), 0, func(key []byte, at int) int {
		var dst *string
		switch unquote(key) {
		case "node_id":
			dst = &md.NodeID
		case "prompt_id":
			dst = &md.PromptID
		case "display_node_id":
			dst = &md.DisplayNodeID
		case "real_node_id":
			dst = &md.RealNodeID
		case "image_type":
			dst = &md.ImageType
		case "parent_node_id": // (dst stays nil)
		default:
			return validValue(b, at, 1)
		}
		end, null := stringOrNullAt(b, at)
		switch {
		case end < 0:
		case dst != nil && !null:
			*dst = unquote(b[at:end])
		case dst == nil && null:
			md.ParentNodeID = nil
		case dst == nil:
			s := unquote(b[at:end])
			md.ParentNodeID = &s
		}
		return end
	})
	if e < 0 || skipSpace(b, e) != len(b) {
		return PreviewMetadata{}, false
	}
	return md, true
}

// TextFrame is a decoded type-3 progress-text frame in the legacy layout
// [u32 3][u32 len][node id][text], or the newer one that also carries a
// prompt_id: [u32 3][u32 len][prompt id][u32 len][node id][text].
type TextFrame struct {
	PromptID string
	NodeID   string
	Text     []byte
}

// ParseText decodes a type-3 frame. withPromptID selects the layout.
func ParseText(frame []byte, withPromptID bool) (TextFrame, error) {
	var tf TextFrame
	if len(frame) < 8 {
		return tf, errShortFrame
	}
	rest := frame[4:]
	readStr := func() (string, bool) {
		if len(rest) < 4 {
			return "", false
		}
		n := binary.BigEndian.Uint32(rest)
		if uint64(n) > uint64(len(rest)-4) {
			return "", false
		}
		s := string(rest[4 : 4+n])
		rest = rest[4+n:]
		return s, true
	}
	var ok bool
	if withPromptID {
		if tf.PromptID, ok = readStr(); !ok {
			return tf, errShortFrame
		}
	}
	if tf.NodeID, ok = readStr(); !ok {
		return tf, errShortFrame
	}
	tf.Text = rest
	return tf, nil
}

// Encode builds a type-3 frame; withPromptID selects the layout.
func (tf TextFrame) Encode(withPromptID bool) []byte {
	n := 4 + 4 + len(tf.NodeID) + len(tf.Text)
	if withPromptID {
		n += 4 + len(tf.PromptID)
	}
	out := make([]byte, 0, n)
	out = binary.BigEndian.AppendUint32(out, BinaryText)
	if withPromptID {
		out = binary.BigEndian.AppendUint32(out, uint32(len(tf.PromptID)))
		out = append(out, tf.PromptID...)
	}
	out = binary.BigEndian.AppendUint32(out, uint32(len(tf.NodeID)))
	out = append(out, tf.NodeID...)
	return append(out, tf.Text...)
}
