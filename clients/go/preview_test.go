package preview

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/preview-env/preview/clients/go/previewv1"
)

// The Rust suite (tests/install.rs) runs this against previewd installed
// in the local cluster from deploy/previewd, and sets these variables; with
// PREVIEW_CA_FILE it speaks TLS, checks PREVIEW_SERVER_NAME in previewd's
// certificate (the address is its Service's IP), and sends PREVIEW_TOKEN.
func live(t *testing.T) (*Client, string, string) {
	server, ns, image := os.Getenv("PREVIEW_SERVER"), os.Getenv("PREVIEW_TEST_NAMESPACE"), os.Getenv("PREVIEW_TEST_IMAGE")
	if server == "" || ns == "" || image == "" {
		t.Skip("needs a live previewd: PREVIEW_SERVER, PREVIEW_TEST_NAMESPACE and PREVIEW_TEST_IMAGE")
	}
	var c *Client
	var err error
	if ca := os.Getenv("PREVIEW_CA_FILE"); ca != "" {
		c, err = DialWith(server, Credentials{
			CAFile: ca, Token: os.Getenv("PREVIEW_TOKEN"), ServerName: os.Getenv("PREVIEW_SERVER_NAME"),
		})
	} else {
		c, err = Dial(server)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, ns, image
}

func TestCycle(t *testing.T) {
	c, ns, image := live(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	key := fmt.Sprintf("go-%d", time.Now().UnixNano()%1_000_000)
	var steps []string
	if err := Cycle(ctx, c, key, ns, image, func(s string) { steps = append(steps, s); t.Log(s) }); err != nil {
		t.Fatal(err)
	}
	if len(steps) < 4 {
		t.Fatalf("steps: %v", steps)
	}
	// Gone after clean: a Status snapshot no longer lists it.
	for ev, err := range c.Watch(ctx, &previewv1.StatusRequest{Key: key}) {
		if err != nil {
			t.Fatal(err)
		}
		if len(ev.Environments) != 0 {
			t.Fatalf("after clean: %v", ev.Environments)
		}
		break
	}
}

func TestBadInputIsInvalidArgument(t *testing.T) {
	c, ns, _ := live(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Start(ctx, &previewv1.StartRequest{Key: "Not A Label", Pods: []*previewv1.PodRequest{
		{Target: "targetless", Image: "x", Namespace: ns},
	}})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("got %v, want InvalidArgument", err)
	}
	_, err = c.AddPod(ctx, &previewv1.AddPodRequest{Key: "no-such-key", Pod: &previewv1.PodRequest{Target: "targetless", Image: "x", Namespace: ns}})
	if status.Code(err) != codes.NotFound {
		t.Fatalf("got %v, want NotFound", err)
	}
}
