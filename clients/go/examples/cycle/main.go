// Command cycle runs one environment through its life against a previewd:
//
//	go run ./examples/cycle -server previewd.preview-system.svc:7443 -ca ca.crt -token "$TOKEN" \
//		-namespace default -image preview.local/echo:v2
//
// Without -ca it speaks plaintext, to a loopback previewd run with --auth none.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	preview "github.com/preview-env/preview/clients/go"
)

func main() {
	server := flag.String("server", envOr("PREVIEW_SERVER", "127.0.0.1:7443"), "previewd address")
	ns := flag.String("namespace", "default", "namespace of the preview pods")
	image := flag.String("image", "preview.local/echo:v2", "image of the preview pods")
	key := flag.String("key", fmt.Sprintf("example-%d", time.Now().Unix()%100000), "environment key")
	ca := flag.String("ca", os.Getenv("PREVIEW_CA_FILE"), "previewd's CA (the ConfigMap previewd-ca); empty: plaintext")
	token := flag.String("token", os.Getenv("PREVIEW_TOKEN"), "bearer token")
	flag.Parse()

	var c *preview.Client
	var err error
	if *ca != "" {
		c, err = preview.DialWith(*server, preview.Credentials{CAFile: *ca, Token: *token})
	} else {
		c, err = preview.Dial(*server)
	}
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := preview.Cycle(ctx, c, *key, *ns, *image, func(s string) { fmt.Println(s) }); err != nil {
		log.Fatal(err)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}
