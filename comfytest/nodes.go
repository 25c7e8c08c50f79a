package comfytest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"image"
	"image/draw"
	_ "image/gif" // LoadImage decoders
	"image/jpeg"
	"image/png"
	"math/rand/v2"
	"net/http"
	"path"
	"sort"
	"strings"
	"time"
)

// imgBatch is an IMAGE value: a batch of opaque images. Values are never
// modified after creation, so batches may be shared between nodes and the
// cache.
type imgBatch []*image.NRGBA

// maskBatch is a MASK value.
type maskBatch []*image.Gray

type inputDef struct {
	name     string
	typ      string // IMAGE, MASK, INT, FLOAT, STRING, COMBO
	opts     obj
	min, max *pyNum
	combo    func(s *Server) []string
	// validate is a VALIDATE_INPUTS-style check: it returns the reason text
	// and false when the value is bad.
	validate func(s *Server, v any) (string, bool)
}

func (d inputDef) info(s *Server) []any {
	var first any = d.typ
	if d.typ == "COMBO" {
		list := d.combo(s)
		arr := make([]any, len(list))
		for i, x := range list {
			arr[i] = x
		}
		first = arr
	}
	if d.opts == nil {
		return []any{first}
	}
	return []any{first, d.opts}
}

type nodeDef struct {
	name, display, category, module, description string
	required, optional                           []inputDef
	hidden                                       obj
	outputs                                      []string
	outputNode                                   bool
	// alwaysRun marks IS_CHANGED → time.time(): never served from cache.
	alwaysRun bool
	// changed adds IS_CHANGED data to the cache signature.
	changed func(s *Server, n *pnode) string
	run     func(c *nodeCtx, in map[string]any) ([]any, obj, error)
}

func (d *nodeDef) allInputs() []inputDef {
	return append(append([]inputDef{}, d.required...), d.optional...)
}

func intIn(name string, def, min, max int64, extra ...kv) inputDef {
	mn, mx := intNum(min), intNum(max)
	o := obj{{"default", intNum(def)}, {"min", mn}, {"max", mx}}
	o = append(o, extra...)
	return inputDef{name: name, typ: "INT", opts: o, min: &mn, max: &mx}
}

func floatIn(name string, def, min, max, step float64) inputDef {
	mn, mx := pyNum{min, true}, pyNum{max, true}
	o := obj{{"default", pyNum{def, true}}, {"min", mn}, {"max", mx}, {"step", pyNum{step, true}}}
	return inputDef{name: name, typ: "FLOAT", opts: o, min: &mn, max: &mx}
}

const maxResolution = 16384

var nodeDefs = map[string]*nodeDef{}

func init() {
	imageHidden := obj{{"prompt", "PROMPT"}, {"extra_pnginfo", "EXTRA_PNGINFO"}}
	defs := []*nodeDef{
		{
			name: "EmptyImage", display: "EmptyImage", category: "image", module: "nodes",
			required: []inputDef{
				intIn("width", 512, 1, maxResolution, kv{"step", intNum(1)}),
				intIn("height", 512, 1, maxResolution, kv{"step", intNum(1)}),
				intIn("batch_size", 1, 1, 4096),
				intIn("color", 0, 0, 0xFFFFFF, kv{"step", intNum(1)}, kv{"display", "color"}),
			},
			outputs: []string{"IMAGE"},
			run:     runEmptyImage,
		},
		{
			name: "LoadImage", display: "Load Image", category: "image", module: "nodes",
			required: []inputDef{{
				name: "image", typ: "COMBO", opts: obj{{"image_upload", true}},
				combo:    func(s *Server) []string { return s.inputImageList() },
				validate: validateLoadImage,
			}},
			outputs: []string{"IMAGE", "MASK"},
			changed: loadImageChanged,
			run:     runLoadImage,
		},
		{
			name: "ImageInvert", display: "Invert Image", category: "image", module: "nodes",
			required: []inputDef{{name: "image", typ: "IMAGE"}},
			outputs:  []string{"IMAGE"},
			run:      runImageInvert,
		},
		{
			name: "ImageBlur", display: "Image Blur", category: "image/postprocessing", module: "comfy_extras.nodes_post_processing",
			required: []inputDef{
				{name: "image", typ: "IMAGE"},
				intIn("blur_radius", 1, 1, 31, kv{"step", intNum(1)}),
				floatIn("sigma", 1.0, 0.1, 10.0, 0.1),
			},
			outputs: []string{"IMAGE"},
			run:     runImageBlur,
		},
		{
			name: "SaveImage", display: "Save Image", category: "image", module: "nodes",
			description: "Saves the input images to your ComfyUI output directory.",
			required: []inputDef{
				{name: "images", typ: "IMAGE", opts: obj{{"tooltip", "The images to save."}}},
				{name: "filename_prefix", typ: "STRING", opts: obj{{"default", "ComfyUI"}, {"tooltip", "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}}},
			},
			hidden:     imageHidden,
			outputs:    []string{},
			outputNode: true,
			run:        runSaveImage,
		},
		{
			name: "PreviewImage", display: "Preview Image", category: "image", module: "nodes",
			description: "Saves the input images to your ComfyUI output directory.",
			required:    []inputDef{{name: "images", typ: "IMAGE"}},
			hidden:      imageHidden,
			outputs:     []string{},
			outputNode:  true,
			run:         runPreviewImage,
		},
		{
			name: "SaveImageWebsocket", display: "SaveImageWebsocket", category: "api node/image", module: "custom_nodes.websocket_image_save",
			required:   []inputDef{{name: "images", typ: "IMAGE"}},
			outputs:    []string{},
			outputNode: true,
			alwaysRun:  true,
			run:        runSaveImageWebsocket,
		},
		{
			name: "FakeCheckpointImage", display: "Fake Checkpoint Image (comfytest)", category: "loaders", module: "custom_nodes.comfytest",
			description: "Stands for a model loader: its ckpt_name is a COMBO of the model files this server has (Options.Models); outputs a small image.",
			required: []inputDef{{
				name: "ckpt_name", typ: "COMBO",
				combo: func(s *Server) []string { return s.models() },
			}},
			outputs: []string{"IMAGE"},
			run:     runFakeCheckpointImage,
		},
		{
			name: "FakeSampler", display: "Fake Sampler (comfytest)", category: "sampling", module: "custom_nodes.comfytest",
			description: "Passes its image through unchanged, emitting one progress event and one live preview per step.",
			required:    []inputDef{{name: "image", typ: "IMAGE"}},
			optional:    []inputDef{intIn("steps", 3, 1, 10000)},
			outputs:     []string{"IMAGE"},
			run:         runFakeSampler,
		},
	}
	for _, d := range defs {
		nodeDefs[d.name] = d
	}
}

// objectInfo is one entry of GET /object_info.
func (s *Server) objectInfo(d *nodeDef) obj {
	input := obj{}
	order := obj{}
	addGroup := func(group string, defs []inputDef) {
		if len(defs) == 0 {
			return
		}
		g := obj{}
		names := []any{}
		for _, in := range defs {
			info := in.info(s)
			if in.name == "steps" && d.name == "FakeSampler" {
				info[1] = in.opts.clone().set("default", intNum(int64(s.opts.Steps)))
			}
			g = append(g, kv{in.name, info})
			names = append(names, in.name)
		}
		input = append(input, kv{group, g})
		order = append(order, kv{group, names})
	}
	addGroup("required", d.required)
	addGroup("optional", d.optional)
	if d.hidden != nil {
		input = append(input, kv{"hidden", d.hidden})
		names := []any{}
		for _, h := range d.hidden {
			names = append(names, h.K)
		}
		order = append(order, kv{"hidden", names})
	}
	outs := make([]any, len(d.outputs))
	isList := make([]any, len(d.outputs))
	for i, o := range d.outputs {
		outs[i] = o
		isList[i] = false
	}
	info := obj{{"input", input}, {"input_order", order}}
	if s.v2026 {
		info = append(info, kv{"is_input_list", false})
	}
	info = append(info,
		kv{"output", outs}, kv{"output_is_list", isList}, kv{"output_name", outs},
		kv{"name", d.name}, kv{"display_name", d.display}, kv{"description", d.description},
		kv{"python_module", d.module}, kv{"category", d.category}, kv{"output_node", d.outputNode},
	)
	if s.v2026 {
		info = append(info, kv{"search_aliases", []any{}})
	}
	return info
}

func sortedDefNames() []string {
	names := make([]string, 0, len(nodeDefs))
	for n := range nodeDefs {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func (s *Server) handleObjectInfo(w http.ResponseWriter, r *http.Request, _ map[string]string) {
	out := obj{}
	for _, n := range sortedDefNames() {
		out = append(out, kv{n, s.objectInfo(nodeDefs[n])})
	}
	writeJSON(w, 200, out)
}

func (s *Server) handleObjectInfoClass(w http.ResponseWriter, r *http.Request, p map[string]string) {
	out := obj{}
	if d := nodeDefs[p["node_class"]]; d != nil {
		out = obj{{d.name, s.objectInfo(d)}}
	}
	writeJSON(w, 200, out)
}

// ---- input helpers ----

func inInt(in map[string]any, name string, def int64) (int64, error) {
	v, ok := in[name]
	if !ok {
		return def, nil
	}
	return pyInt(v)
}

func inFloat(in map[string]any, name string, def float64) (float64, error) {
	v, ok := in[name]
	if !ok {
		return def, nil
	}
	return pyFloatConv(v)
}

func inImages(in map[string]any, name string) (imgBatch, error) {
	v, ok := in[name]
	if !ok {
		return nil, pyErr(fmt.Sprintf("missing input '%s'", name))
	}
	b, ok := v.(imgBatch)
	if !ok {
		return nil, pyErr(fmt.Sprintf("'%s' object has no attribute 'shape'", pyTypeName(v)))
	}
	return b, nil
}

// nodeError is an exception raised by a node; exception_type is typ.
type nodeError struct {
	typ, msg string
}

func (e *nodeError) Error() string { return e.msg }

func raise(typ, format string, args ...any) error {
	return &nodeError{typ: typ, msg: fmt.Sprintf(format, args...)}
}

// ---- nodes ----

func runEmptyImage(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	w, err := inInt(in, "width", 512)
	if err != nil {
		return nil, nil, err
	}
	h, err := inInt(in, "height", 512)
	if err != nil {
		return nil, nil, err
	}
	n, err := inInt(in, "batch_size", 1)
	if err != nil {
		return nil, nil, err
	}
	col, err := inInt(in, "color", 0)
	if err != nil {
		return nil, nil, err
	}
	img := image.NewNRGBA(image.Rect(0, 0, int(w), int(h)))
	px := [4]byte{byte(col >> 16), byte(col >> 8), byte(col), 255}
	for i := 0; i < len(img.Pix); i += 4 {
		copy(img.Pix[i:i+4], px[:])
	}
	batch := make(imgBatch, n)
	for i := range batch {
		batch[i] = img
	}
	return []any{batch}, nil, nil
}

// annotatedKey resolves "sub/name.png [output]" style names to a file key;
// the default directory is def.
func annotatedKey(name, def string) (string, bool) {
	dir := def
	for _, a := range []string{"output", "input", "temp"} {
		suffix := "[" + a + "]"
		if strings.HasSuffix(name, suffix) {
			dir = a
			cut := len(suffix) + 1
			if cut > len(name) {
				cut = len(name)
			}
			name = name[:len(name)-cut]
			break
		}
	}
	return fileKey(dir, "", name)
}

func validateLoadImage(s *Server, v any) (string, bool) {
	name := pyStr(v)
	if key, ok := annotatedKey(name, "input"); ok && s.getFile(key) != nil {
		return "", true
	}
	return "Invalid image file: " + name, false
}

func loadImageChanged(s *Server, n *pnode) string {
	v, _ := n.inputs.get("image")
	key, ok := annotatedKey(pyStr(v), "input")
	if !ok {
		return ""
	}
	if f := s.getFile(key); f != nil {
		return fmt.Sprintf("%x", sha256sum(f.data))
	}
	return ""
}

func runLoadImage(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	name := pyStr(in["image"])
	key, ok := annotatedKey(name, "input")
	var f *memFile
	if ok {
		f = c.s.getFile(key)
	}
	if f == nil {
		return nil, nil, raise("FileNotFoundError", "[Errno 2] No such file or directory: '%s'", name)
	}
	img, _, err := image.Decode(bytes.NewReader(f.data))
	if err != nil {
		return nil, nil, raise("PIL.UnidentifiedImageError", "cannot identify image file '%s'", name)
	}
	rgb, alpha := splitAlpha(img)
	var mask *image.Gray
	if alpha != nil {
		mask = image.NewGray(alpha.Rect)
		for i, a := range alpha.Pix {
			mask.Pix[i] = 255 - a
		}
	} else {
		mask = image.NewGray(image.Rect(0, 0, 64, 64))
	}
	return []any{imgBatch{rgb}, maskBatch{mask}}, nil, nil
}

// splitAlpha converts any image to an opaque NRGBA plus its alpha channel
// (nil when the image has no alpha channel).
func splitAlpha(img image.Image) (*image.NRGBA, *image.Gray) {
	b := img.Bounds()
	rect := image.Rect(0, 0, b.Dx(), b.Dy())
	n := image.NewNRGBA(rect)
	draw.Draw(n, rect, img, b.Min, draw.Src)
	hasAlpha := false
	switch m := img.(type) {
	case *image.NRGBA, *image.RGBA, *image.NRGBA64, *image.RGBA64, *image.Alpha, *image.Alpha16:
		hasAlpha = true
	case *image.Paletted:
		for _, c := range m.Palette {
			if _, _, _, a := c.RGBA(); a != 0xffff {
				hasAlpha = true
			}
		}
	}
	var alpha *image.Gray
	if hasAlpha {
		alpha = image.NewGray(rect)
	}
	for i := 0; i < len(n.Pix); i += 4 {
		if alpha != nil {
			alpha.Pix[i/4] = n.Pix[i+3]
		}
		n.Pix[i+3] = 255
	}
	return n, alpha
}

func runImageInvert(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	src, err := inImages(in, "image")
	if err != nil {
		return nil, nil, err
	}
	out := make(imgBatch, len(src))
	for k, img := range src {
		n := image.NewNRGBA(img.Rect)
		for i := 0; i < len(img.Pix); i += 4 {
			n.Pix[i] = 255 - img.Pix[i]
			n.Pix[i+1] = 255 - img.Pix[i+1]
			n.Pix[i+2] = 255 - img.Pix[i+2]
			n.Pix[i+3] = 255
		}
		out[k] = n
	}
	return []any{out}, nil, nil
}

func runImageBlur(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	src, err := inImages(in, "image")
	if err != nil {
		return nil, nil, err
	}
	r, err := inInt(in, "blur_radius", 1)
	if err != nil {
		return nil, nil, err
	}
	if r <= 0 {
		return []any{src}, nil, nil
	}
	out := make(imgBatch, len(src))
	for k, img := range src {
		out[k] = boxBlur(img, int(r))
	}
	return []any{out}, nil, nil
}

// boxBlur is a separable box blur with clamped edges.
func boxBlur(img *image.NRGBA, r int) *image.NRGBA {
	w, h := img.Rect.Dx(), img.Rect.Dy()
	tmp := make([]int32, w*h*3)
	out := image.NewNRGBA(img.Rect)
	clamp := func(v, hi int) int {
		if v < 0 {
			return 0
		}
		if v > hi {
			return hi
		}
		return v
	}
	div := int32(2*r + 1)
	for y := 0; y < h; y++ {
		var sum [3]int32
		for dx := -r; dx <= r; dx++ {
			p := img.PixOffset(clamp(dx, w-1), y)
			for ch := 0; ch < 3; ch++ {
				sum[ch] += int32(img.Pix[p+ch])
			}
		}
		for x := 0; x < w; x++ {
			for ch := 0; ch < 3; ch++ {
				tmp[(y*w+x)*3+ch] = sum[ch]
			}
			pOut := img.PixOffset(clamp(x-r, w-1), y)
			pIn := img.PixOffset(clamp(x+r+1, w-1), y)
			for ch := 0; ch < 3; ch++ {
				sum[ch] += int32(img.Pix[pIn+ch]) - int32(img.Pix[pOut+ch])
			}
		}
	}
	for x := 0; x < w; x++ {
		var sum [3]int32
		for dy := -r; dy <= r; dy++ {
			yy := clamp(dy, h-1)
			for ch := 0; ch < 3; ch++ {
				sum[ch] += tmp[(yy*w+x)*3+ch]
			}
		}
		for y := 0; y < h; y++ {
			p := out.PixOffset(x, y)
			for ch := 0; ch < 3; ch++ {
				out.Pix[p+ch] = uint8((sum[ch] + div*div/2) / (div * div))
			}
			out.Pix[p+3] = 255
			yOut := clamp(y-r, h-1)
			yIn := clamp(y+r+1, h-1)
			for ch := 0; ch < 3; ch++ {
				sum[ch] += tmp[(yIn*w+x)*3+ch] - tmp[(yOut*w+x)*3+ch]
			}
		}
	}
	return out
}

func runSaveImage(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	imgs, err := inImages(in, "images")
	if err != nil {
		return nil, nil, err
	}
	prefix := "ComfyUI"
	if v, ok := in["filename_prefix"]; ok {
		prefix = pyStr(v)
	}
	return c.saveImages(imgs, prefix, "output")
}

func runPreviewImage(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	imgs, err := inImages(in, "images")
	if err != nil {
		return nil, nil, err
	}
	return c.saveImages(imgs, "ComfyUI"+c.previewSuffix(), "temp")
}

const previewLetters = "abcdefghijklmnopqrstupvxyz" // sic, as in ComfyUI

// previewSuffix is PreviewImage's per-node-object "_temp_xxxxx".
func (c *nodeCtx) previewSuffix() string {
	o, ok := c.s.objects[c.node.id]
	if !ok || o.class != c.node.class {
		b := make([]byte, 5)
		for i := range b {
			b[i] = previewLetters[rand.IntN(len(previewLetters))]
		}
		o = nodeObject{class: c.node.class, suffix: "_temp_" + string(b)}
		c.s.objects[c.node.id] = o
	}
	return o.suffix
}

type nodeObject struct {
	class, suffix string
}

// saveImages is ComfyUI's SaveImage.save_images.
func (c *nodeCtx) saveImages(imgs imgBatch, prefix, typ string) ([]any, obj, error) {
	if len(imgs) == 0 {
		return nil, obj{{"images", []any{}}}, nil
	}
	w, h := imgs[0].Rect.Dx(), imgs[0].Rect.Dy()
	prefix = strings.ReplaceAll(prefix, "%width%", fmt.Sprint(w))
	prefix = strings.ReplaceAll(prefix, "%height%", fmt.Sprint(h))
	clean := path.Clean(prefix)
	subfolder, filename := path.Split(clean)
	subfolder = strings.TrimSuffix(subfolder, "/")
	if _, ok := fileKey(typ, subfolder, "x"); !ok || strings.HasPrefix(clean, "/") {
		return nil, nil, raise("Exception", "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: %s\n         output_dir: %s", subfolder, typ)
	}
	counter := c.s.nextCounter(typ, subfolder, filename)
	var texts []kv
	texts = append(texts, kv{"prompt", string(asciiJSON(c.job.prompt))})
	if pi, ok := c.job.extra.get("extra_pnginfo"); ok {
		if po, ok := pi.(obj); ok {
			for _, e := range po {
				texts = append(texts, kv{e.K, string(asciiJSON(e.V))})
			}
		}
	}
	results := []any{}
	for batchNum, img := range imgs {
		name := strings.ReplaceAll(filename, "%batch_num%", fmt.Sprint(batchNum))
		file := fmt.Sprintf("%s_%05d_.png", name, counter)
		data, err := encodePNG(img)
		if err != nil {
			return nil, nil, err
		}
		data = pngWithText(data, texts)
		key, _ := fileKey(typ, subfolder, file)
		c.s.putFile(key, data)
		results = append(results, obj{{"filename", file}, {"subfolder", subfolder}, {"type", typ}})
		counter++
	}
	return nil, obj{{"images", results}}, nil
}

func runSaveImageWebsocket(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	imgs, err := inImages(in, "images")
	if err != nil {
		return nil, nil, err
	}
	for step, img := range imgs {
		data, err := encodePNG(img)
		if err != nil {
			return nil, nil, err
		}
		if err := c.progress(step, len(imgs), &preview{format: "PNG", data: data}); err != nil {
			return nil, nil, err
		}
	}
	return nil, nil, nil
}

func runFakeSampler(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	imgs, err := inImages(in, "image")
	if err != nil {
		return nil, nil, err
	}
	steps, err := inInt(in, "steps", int64(c.s.opts.Steps))
	if err != nil {
		return nil, nil, err
	}
	var base *image.NRGBA
	if len(imgs) > 0 {
		base = fitWithin(imgs[0], 512)
	}
	start := time.Now()
	for i := int64(1); i <= steps; i++ {
		d := c.s.opts.StepDelay
		if c.s.opts.FixedRate {
			d = time.Until(start.Add(time.Duration(i) * d))
		}
		if err := c.workFor(d); err != nil {
			return nil, nil, err
		}
		var pv *preview
		if every := int64(c.s.opts.PreviewEvery); base != nil && (every <= 0 || i%every == 0) {
			data, err := samplerPreview(base, float64(i)/float64(steps), c.s.opts.PreviewBytes)
			if err != nil {
				return nil, nil, err
			}
			pv = &preview{format: "JPEG", data: data}
		}
		if err := c.progress(int(i), int(steps), pv); err != nil {
			return nil, nil, err
		}
	}
	return []any{imgs}, nil, nil
}

// ---- image encoding helpers ----

func encodePNG(img image.Image) ([]byte, error) {
	var b bytes.Buffer
	enc := png.Encoder{CompressionLevel: png.BestSpeed}
	if err := enc.Encode(&b, img); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// pngWithText inserts tEXt chunks right after IHDR, like PIL's PngInfo.
func pngWithText(data []byte, texts []kv) []byte {
	const ihdrEnd = 8 + 4 + 4 + 13 + 4
	if len(data) < ihdrEnd || len(texts) == 0 {
		return data
	}
	var out bytes.Buffer
	out.Write(data[:ihdrEnd])
	for _, t := range texts {
		writePNGChunk(&out, "tEXt", append(append([]byte(t.K), 0), []byte(t.V.(string))...))
	}
	out.Write(data[ihdrEnd:])
	return out.Bytes()
}

func writePNGChunk(w *bytes.Buffer, typ string, payload []byte) {
	var hdr [8]byte
	binary.BigEndian.PutUint32(hdr[:4], uint32(len(payload)))
	copy(hdr[4:], typ)
	w.Write(hdr[:])
	w.Write(payload)
	crc := crc32.NewIEEE()
	crc.Write(hdr[4:])
	crc.Write(payload)
	var c [4]byte
	binary.BigEndian.PutUint32(c[:], crc.Sum32())
	w.Write(c[:])
}

// pngTextChunks reads the tEXt chunks of a PNG.
func pngTextChunks(data []byte) map[string]string {
	out := map[string]string{}
	if len(data) < 8 {
		return out
	}
	p := 8
	for p+8 <= len(data) {
		n := int(binary.BigEndian.Uint32(data[p:]))
		typ := string(data[p+4 : p+8])
		if p+12+n > len(data) || n < 0 {
			break
		}
		if typ == "tEXt" {
			payload := data[p+8 : p+8+n]
			if i := bytes.IndexByte(payload, 0); i >= 0 {
				out[string(payload[:i])] = string(payload[i+1:])
			}
		}
		if typ == "IEND" {
			break
		}
		p += 12 + n
	}
	return out
}

func encodeJPEG(img image.Image, quality int) ([]byte, error) {
	var b bytes.Buffer
	if err := jpeg.Encode(&b, img, &jpeg.Options{Quality: quality}); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// fitWithin scales img down (nearest neighbour) to fit a size×size box.
func fitWithin(img *image.NRGBA, size int) *image.NRGBA {
	w, h := img.Rect.Dx(), img.Rect.Dy()
	if w <= size && h <= size {
		return img
	}
	nw, nh := size, size
	if w > h {
		nh = max(1, h*size/w)
	} else {
		nw = max(1, w*size/h)
	}
	out := image.NewNRGBA(image.Rect(0, 0, nw, nh))
	for y := 0; y < nh; y++ {
		sy := y * h / nh
		for x := 0; x < nw; x++ {
			sx := x * w / nw
			copy(out.Pix[out.PixOffset(x, y):out.PixOffset(x, y)+4], img.Pix[img.PixOffset(sx, sy):img.PixOffset(sx, sy)+4])
		}
	}
	return out
}

// samplerPreview renders the "denoising" preview for fraction t of the run
// as JPEG, padded with comment segments to about pad bytes.
func samplerPreview(base *image.NRGBA, t float64, pad int) ([]byte, error) {
	img := image.NewNRGBA(base.Rect)
	a := int(t * 256)
	for i := 0; i < len(base.Pix); i += 4 {
		for ch := 0; ch < 3; ch++ {
			img.Pix[i+ch] = uint8((int(base.Pix[i+ch])*a + 128*(256-a)) >> 8)
		}
		img.Pix[i+3] = 255
	}
	data, err := encodeJPEG(img, 95)
	if err != nil {
		return nil, err
	}
	return padJPEG(data, pad), nil
}

// padJPEG inserts COM segments after SOI until the file is about n bytes.
func padJPEG(data []byte, n int) []byte {
	if n <= len(data) || len(data) < 2 {
		return data
	}
	var out bytes.Buffer
	out.Grow(n + 8)
	out.Write(data[:2])
	need := n - len(data)
	for need > 0 {
		payload := min(max(need-4, 0), 65533)
		seg := payload + 2 // the length field counts itself
		out.Write([]byte{0xFF, 0xFE, byte(seg >> 8), byte(seg)})
		out.Write(bytes.Repeat([]byte{'.'}, payload))
		need -= payload + 4
	}
	out.Write(data[2:])
	return out.Bytes()
}

var errNotImage = errors.New("not an image")

// decodeAny decodes png/jpeg/gif bytes.
func decodeAny(data []byte) (image.Image, error) {
	img, _, err := image.Decode(bytes.NewReader(data))
	if err != nil {
		return nil, errNotImage
	}
	return img, nil
}

// models lists the model files the server "has" (Options.Models, default
// one SD checkpoint).
func (s *Server) models() []string {
	if len(s.opts.Models) > 0 {
		return append([]string(nil), s.opts.Models...)
	}
	return []string{"sd_xl_base_1.0.safetensors"}
}

func runFakeCheckpointImage(c *nodeCtx, in map[string]any) ([]any, obj, error) {
	img := image.NewNRGBA(image.Rect(0, 0, 32, 32))
	for i := 0; i < len(img.Pix); i += 4 {
		copy(img.Pix[i:i+4], []byte{40, 80, 120, 255})
	}
	return []any{imgBatch{img}}, nil, nil
}
