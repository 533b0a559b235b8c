// Package preview is a small client for previewd's PreviewService.
//
// The generated stubs are in package previewv1; this package adds Dial and
// Watch, which turns the Status stream into an iterator:
//
//	c, err := preview.Dial("previewd.preview-system:7443")
//	...
//	for ev, err := range c.Watch(ctx, &previewv1.StatusRequest{Key: key}) { ... }
package preview

import (
	"context"
	"errors"
	"io"
	"iter"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/preview-env/preview/clients/go/previewv1"
)

// Client is a PreviewService client over one connection.
type Client struct {
	previewv1.PreviewServiceClient
	conn *grpc.ClientConn
}

// Dial connects to previewd at target ("host:port", the CLI's
// "http://host:port", or any gRPC target). Without options the connection is
// plaintext h2c, as previewd serves it; options are appended and may
// override that.
func Dial(target string, opts ...grpc.DialOption) (*Client, error) {
	target = strings.TrimPrefix(target, "http://")
	all := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	conn, err := grpc.NewClient(target, all...)
	if err != nil {
		return nil, err
	}
	return &Client{PreviewServiceClient: previewv1.NewPreviewServiceClient(conn), conn: conn}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Watch streams status events: first a snapshot, then changes. The stream
// ends when the loop breaks, ctx ends, or the server goes away; a final
// non-nil error says why it ended early (never io.EOF or the caller's own
// cancellation).
func (c *Client) Watch(ctx context.Context, req *previewv1.StatusRequest) iter.Seq2[*previewv1.StatusEvent, error] {
	return func(yield func(*previewv1.StatusEvent, error) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel() // breaking out of the loop cancels the stream
		watch := &previewv1.StatusRequest{Key: req.GetKey(), Namespace: req.GetNamespace(), Watch: true}
		stream, err := c.Status(ctx, watch)
		if err != nil {
			yield(nil, err)
			return
		}
		for {
			ev, err := stream.Recv()
			if errors.Is(err, io.EOF) || (err != nil && ctx.Err() != nil) {
				return
			}
			if err != nil {
				yield(nil, err)
				return
			}
			if !yield(ev, nil) {
				return
			}
		}
	}
}

// Ready reports whether every pod of env is ready and nothing is pending.
func Ready(env *previewv1.Environment) bool {
	if env == nil || env.Pending || len(env.Pods) == 0 {
		return false
	}
	for _, p := range env.Pods {
		if !p.Ready {
			return false
		}
	}
	return true
}
