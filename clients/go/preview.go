// Package preview is a small client for previewd's PreviewService.
//
// The generated stubs are in package previewv1; this package adds Dial,
// DialWith (TLS and credentials) and Watch, which turns the Status stream
// into an iterator:
//
//	c, err := preview.DialWith("previewd.preview-system.svc:7443", preview.Credentials{
//		CAFile: "ca.crt", // previewd's CA: the ConfigMap preview-system/previewd-ca
//		Token:  token,    // or CertFile and KeyFile: a certificate the cluster's CA signed
//	})
//	...
//	for ev, err := range c.Watch(ctx, &previewv1.StatusRequest{Key: key}) { ... }
package preview

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"iter"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/preview-env/preview/clients/go/previewv1"
)

// Client is a PreviewService client over one connection.
type Client struct {
	previewv1.PreviewServiceClient
	conn *grpc.ClientConn
}

// Dial connects to previewd at target ("host:port", the CLI's
// "http://host:port", or any gRPC target) over plaintext h2c, which only a
// previewd run with --auth none on loopback serves. Options are appended
// and may override that; DialWith is the usual way in.
func Dial(target string, opts ...grpc.DialOption) (*Client, error) {
	target = strings.TrimPrefix(target, "http://")
	all := append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)
	return dial(target, all)
}

// Credentials say whom to trust and who is calling.
type Credentials struct {
	// CAFile holds the CA that previewd's certificate chains to: the
	// ConfigMap previewd-ca (key ca.crt) in previewd's namespace.
	CAFile string
	// Token is a bearer token previewd checks with a TokenReview (audience
	// "previewd", or the API server's own when previewd accepts it).
	Token string
	// CertFile and KeyFile are a client certificate the cluster's CA signed
	// (user = CN, groups = O), instead of a token.
	CertFile, KeyFile string
	// ServerName is the name checked in previewd's certificate, when target
	// is not one of its names (a port-forward, say).
	ServerName string
}

// DialWith connects to previewd at target ("host:port" or "https://host:port")
// over TLS, presenting c's token or certificate.
func DialWith(target string, c Credentials, opts ...grpc.DialOption) (*Client, error) {
	target = strings.TrimPrefix(target, "https://")
	ca, err := os.ReadFile(c.CAFile)
	if err != nil {
		return nil, fmt.Errorf("CAFile: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("CAFile %s: no PEM certificate in it", c.CAFile)
	}
	conf := &tls.Config{RootCAs: roots, ServerName: c.ServerName, MinVersion: tls.VersionTLS12}
	if c.CertFile != "" || c.KeyFile != "" {
		pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("CertFile/KeyFile: %w", err)
		}
		conf.Certificates = []tls.Certificate{pair}
	}
	all := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(conf))}
	if c.Token != "" {
		all = append(all, grpc.WithPerRPCCredentials(bearer(c.Token)))
	}
	return dial(target, append(all, opts...))
}

func dial(target string, opts []grpc.DialOption) (*Client, error) {
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, err
	}
	return &Client{PreviewServiceClient: previewv1.NewPreviewServiceClient(conn), conn: conn}, nil
}

// bearer sends "authorization: Bearer <token>" with every call, over TLS only.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

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
