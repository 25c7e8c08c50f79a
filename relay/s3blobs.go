package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Options configure S3Blobs (any S3-compatible service: AWS S3, R2, MinIO,
// versitygw...).
type S3Options struct {
	// Endpoint is host[:port] of the S3 API, as this server reaches it.
	Endpoint string
	// Secure selects https toward Endpoint.
	Secure bool
	// Bucket holds the outputs; Prefix (optional) is put before every key.
	Bucket, Prefix string
	// Region of the bucket; empty asks the service once (AWS) or uses its
	// default. R2 wants "auto".
	Region string
	// AccessKey and SecretKey sign requests. Both empty: taken from the
	// environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or MINIO_*).
	AccessKey, SecretKey string
	// PublicEndpoint, if set, is the host[:port] presigned URLs are made for
	// (browsers reach the bucket there). A presigned URL is bound to the host
	// it was signed for, so it is signed by a client configured for that
	// host. PublicSecure selects https there.
	PublicEndpoint string
	PublicSecure   bool
	// PartSize is the multipart part size (default 16 MiB; S3's minimum is
	// 5 MiB). A streamed Put holds one part in memory at a time.
	PartSize int64
}

// DefaultS3PartSize is the part size of multipart uploads when
// S3Options.PartSize is 0.
const DefaultS3PartSize = 16 << 20

const (
	s3MinPartSize = 5 << 20
	s3MaxParts    = 10000
	// s3MetaKey is stored as x-amz-meta-comfyume-key on every object.
	s3MetaKey = "Comfyume-Key"
)

// S3Blobs keeps outputs in an S3-compatible bucket. Objects are named
// Prefix + key and carry their content type and the key as metadata.
type S3Blobs struct {
	client   *minio.Client
	creds    *credentials.Credentials
	opts     S3Options
	prefix   string
	partSize int64
	bufs     sync.Pool // *[]byte of partSize, for streamed Puts

	presignMu sync.Mutex
	presign   *minio.Client // signs for PublicEndpoint; nil until first needed
}

var (
	_ Blobs     = (*S3Blobs)(nil)
	_ Presigner = (*S3Blobs)(nil)
)

// NewS3Blobs makes the client. It does not fail because the service is
// unreachable (a briefly unavailable S3 must not stop Caddy from starting):
// it tries once, within a few seconds, to create the bucket if it is
// missing, and otherwise lets operations report errors.
func NewS3Blobs(ctx context.Context, o S3Options) (*S3Blobs, error) {
	if o.Endpoint == "" || o.Bucket == "" {
		return nil, errors.New("relay: s3 endpoint and bucket are required")
	}
	if (o.AccessKey == "") != (o.SecretKey == "") {
		return nil, errors.New("relay: s3 access key and secret key go together")
	}
	if o.PartSize == 0 {
		o.PartSize = DefaultS3PartSize
	}
	if o.PartSize < s3MinPartSize {
		return nil, fmt.Errorf("relay: s3 part size %d is below S3's minimum of 5 MiB", o.PartSize)
	}
	creds := credentials.NewStaticV4(o.AccessKey, o.SecretKey, "")
	if o.AccessKey == "" {
		creds = credentials.NewChainCredentials([]credentials.Provider{&credentials.EnvAWS{}, &credentials.EnvMinio{}})
	}
	client, err := newS3Client(o.Endpoint, o.Secure, o.Region, creds)
	if err != nil {
		return nil, err
	}
	s := &S3Blobs{client: client, creds: creds, opts: o, partSize: o.PartSize}
	if p := strings.Trim(o.Prefix, "/"); p != "" {
		s.prefix = p + "/"
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_ = s.EnsureBucket(cctx)
	return s, nil
}

func newS3Client(endpoint string, secure bool, region string, creds *credentials.Credentials) (*minio.Client, error) {
	tr, err := minio.DefaultTransport(secure)
	if err != nil {
		return nil, err
	}
	// Fail over to the spool within seconds when the service is down, not
	// after minio's default 10 attempts of a 30 s dial each.
	tr.DialContext = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	return minio.New(endpoint, &minio.Options{
		Creds:      creds,
		Secure:     secure,
		Region:     region,
		Transport:  tr,
		MaxRetries: 3,
	})
}

// EnsureBucket creates the bucket if it does not exist.
func (s *S3Blobs) EnsureBucket(ctx context.Context) error {
	ok, err := s.client.BucketExists(ctx, s.opts.Bucket)
	if err != nil || ok {
		return err
	}
	err = s.client.MakeBucket(ctx, s.opts.Bucket, minio.MakeBucketOptions{Region: s.opts.Region})
	if code := minio.ToErrorResponse(err).Code; code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists" {
		return nil
	}
	return err
}

// object is the object name of a key, with the same rules as DiskBlobs.
func (s *S3Blobs) object(key string) (string, error) {
	clean := path.Clean("/" + key)
	if clean == "/" || strings.Contains(key, "\x00") || strings.Contains(key, "..") {
		return "", ErrBlobNotFound
	}
	return s.prefix + clean[1:], nil
}

func (s *S3Blobs) putOptions(key string, info BlobInfo) minio.PutObjectOptions {
	ct := info.ContentType
	if ct == "" {
		ct = contentTypeOf(key)
	}
	return minio.PutObjectOptions{
		ContentType:  ct,
		UserMetadata: map[string]string{s3MetaKey: key},
		PartSize:     uint64(s.partSize),
		// Without this minio-go signs bodies sent over plain http with the
		// streaming signature (aws-chunked), which some servers (versitygw
		// v1.8.0) store as the object's Content-Encoding and send back to
		// browsers. The payload then goes unsigned, as it does over https.
		DisableContentSha256: true,
	}
}

// Put implements Blobs. r is streamed: at most one part (PartSize) is held in
// memory. info.Size, when > 0, must be r's exact length (it lets a file
// upload as one request or in parallel parts); otherwise the length is
// found by reading, and a file smaller than one part goes up as a single
// PUT.
func (s *S3Blobs) Put(ctx context.Context, key string, r io.Reader, info BlobInfo) error {
	name, err := s.object(key)
	if err != nil {
		return err
	}
	opts := s.putOptions(key, info)
	if info.Size > 0 {
		_, err := s.client.PutObject(ctx, s.opts.Bucket, name, r, info.Size, opts)
		return err
	}
	bp, _ := s.bufs.Get().(*[]byte)
	if bp == nil {
		b := make([]byte, s.partSize)
		bp = &b
	}
	defer s.bufs.Put(bp)
	buf := *bp
	n, err := io.ReadFull(r, buf)
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		_, err = s.client.PutObject(ctx, s.opts.Bucket, name, bytes.NewReader(buf[:n]), int64(n), opts)
		return err
	}
	if err != nil {
		return err
	}
	return s.putMultipart(ctx, name, r, buf, opts)
}

// putMultipart uploads buf (a full first part) and the rest of r, reusing buf
// for every part.
func (s *S3Blobs) putMultipart(ctx context.Context, name string, r io.Reader, buf []byte, opts minio.PutObjectOptions) (err error) {
	core := minio.Core{Client: s.client}
	id, err := core.NewMultipartUpload(ctx, s.opts.Bucket, name, opts)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			_ = core.AbortMultipartUpload(actx, s.opts.Bucket, name, id)
		}
	}()
	var parts []minio.CompletePart
	n := len(buf)
	for num := 1; ; num++ {
		if num > s3MaxParts {
			return fmt.Errorf("relay: %s is larger than %d parts of %d bytes", name, s3MaxParts, len(buf))
		}
		part, err := core.PutObjectPart(ctx, s.opts.Bucket, name, id, num, bytes.NewReader(buf[:n]), int64(n),
			minio.PutObjectPartOptions{DisableContentSha256: true})
		if err != nil {
			return err
		}
		parts = append(parts, minio.CompletePart{PartNumber: num, ETag: part.ETag})
		if n < len(buf) {
			break // that was the short last part
		}
		n, err = io.ReadFull(r, buf)
		if err == io.EOF {
			break
		}
		if err != nil && err != io.ErrUnexpectedEOF {
			return err
		}
	}
	_, err = core.CompleteMultipartUpload(ctx, s.opts.Bucket, name, id, parts, opts)
	return err
}

// s3Blob is an open object; minio's *Object reads lazily and seeks with
// ranged GETs, which is what http.ServeContent needs for Range requests.
type s3Blob struct {
	*minio.Object
	info BlobInfo
}

func (b *s3Blob) Info() BlobInfo { return b.info }

// Open implements Blobs. The object's body is fetched as it is read; ctx
// must live as long as the Blob is used.
func (s *S3Blobs) Open(ctx context.Context, key string) (Blob, error) {
	name, err := s.object(key)
	if err != nil {
		return nil, err
	}
	obj, err := s.client.GetObject(ctx, s.opts.Bucket, name, minio.GetObjectOptions{})
	if err != nil {
		return nil, err
	}
	st, err := obj.Stat()
	if err != nil {
		obj.Close()
		if resp := minio.ToErrorResponse(err); resp.Code == minio.NoSuchKey || resp.Code == "NotFound" {
			return nil, ErrBlobNotFound
		}
		return nil, err
	}
	return &s3Blob{Object: obj, info: BlobInfo{
		ContentType: st.ContentType,
		Size:        st.Size,
		ModTime:     st.LastModified,
	}}, nil
}

// RemoveJob implements Blobs: it lists the job's objects and removes them.
func (s *S3Blobs) RemoveJob(ctx context.Context, job string) error {
	folder, err := jobFolder(job)
	if err != nil {
		return err
	}
	objects := make(chan minio.ObjectInfo)
	var listErr error
	go func() {
		defer close(objects)
		for o := range s.client.ListObjects(ctx, s.opts.Bucket, minio.ListObjectsOptions{Prefix: s.prefix + folder, Recursive: true}) {
			if o.Err != nil {
				listErr = o.Err
				return
			}
			objects <- o
		}
	}()
	for r := range s.client.RemoveObjects(ctx, s.opts.Bucket, objects, minio.RemoveObjectsOptions{}) {
		if r.Err != nil && err == nil {
			err = r.Err
		}
	}
	if err == nil {
		err = listErr
	}
	return err
}

// PresignGet returns a URL that serves the object without credentials for
// expiry, with Content-Disposition naming filename. It is signed for
// PublicEndpoint when that is set.
func (s *S3Blobs) PresignGet(ctx context.Context, key, filename string, expiry time.Duration) (*url.URL, error) {
	name, err := s.object(key)
	if err != nil {
		return nil, err
	}
	c, err := s.presignClient(ctx)
	if err != nil {
		return nil, err
	}
	q := url.Values{}
	if filename != "" {
		// Like /view: only media are shown; anything else is a download,
		// never a page (here of the bucket's origin).
		kind := "inline"
		if !servedInline(contentTypeOf(filename)) {
			kind = "attachment"
			q.Set("response-content-type", "application/octet-stream")
		}
		q.Set("response-content-disposition", disposition(kind, filename))
	}
	return c.PresignedGetObject(ctx, s.opts.Bucket, name, expiry, q)
}

// presignClient is the client whose host ends up in presigned URLs. Signing
// needs the bucket's region; when it is not configured it is asked of the
// internal endpoint once (the public one may not be reachable from here).
func (s *S3Blobs) presignClient(ctx context.Context) (*minio.Client, error) {
	if s.opts.PublicEndpoint == "" {
		return s.client, nil
	}
	s.presignMu.Lock()
	defer s.presignMu.Unlock()
	if s.presign != nil {
		return s.presign, nil
	}
	region := s.opts.Region
	if region == "" {
		var err error
		if region, err = s.client.GetBucketLocation(ctx, s.opts.Bucket); err != nil {
			return nil, err
		}
	}
	c, err := newS3Client(s.opts.PublicEndpoint, s.opts.PublicSecure, region, s.creds)
	if err != nil {
		return nil, err
	}
	s.presign = c
	return c, nil
}
