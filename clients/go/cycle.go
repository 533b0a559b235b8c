package preview

import (
	"context"
	"fmt"

	"github.com/preview-env/preview/clients/go/previewv1"
)

// Cycle starts an environment with one targetless pod, adds a second, waits
// until both are ready, and cleans it: the whole life of an environment, as
// the example and the test run it. progress, when not nil, gets a line per step.
func Cycle(ctx context.Context, c *Client, key, namespace, image string, progress func(string)) error {
	say := func(f string, a ...any) {
		if progress != nil {
			progress(fmt.Sprintf(f, a...))
		}
	}
	pod := func(name string) *previewv1.PodRequest {
		return &previewv1.PodRequest{Target: "targetless", Image: image, Namespace: namespace, Name: name}
	}
	started, err := c.Start(ctx, &previewv1.StartRequest{Key: key, Ttl: "10m", Pods: []*previewv1.PodRequest{pod("web")}})
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	say("started %s", started.Key)
	if _, err := c.AddPod(ctx, &previewv1.AddPodRequest{Key: key, Pod: pod("worker")}); err != nil {
		return fmt.Errorf("add pod: %w", err)
	}
	say("added worker")
	ready := false
	for ev, err := range c.Watch(ctx, &previewv1.StatusRequest{Key: key}) {
		if err != nil {
			return fmt.Errorf("watch: %w", err)
		}
		for _, env := range ev.Environments {
			say("%s: %d pods, ready=%v", ev.Kind, len(env.Pods), Ready(env))
			if env.Key == key && len(env.Pods) == 2 && Ready(env) {
				ready = true
			}
		}
		if ready {
			break
		}
	}
	if !ready {
		return fmt.Errorf("watch ended before %s was ready: %w", key, ctx.Err())
	}
	cleaned, err := c.Clean(ctx, &previewv1.CleanRequest{Selector: &previewv1.CleanRequest_Key{Key: key}})
	if err != nil {
		return fmt.Errorf("clean: %w", err)
	}
	if len(cleaned.Removed) != 1 || cleaned.Removed[0].Key != key {
		return fmt.Errorf("clean removed %v, want %s", cleaned.Removed, key)
	}
	say("cleaned %s (%d objects)", key, len(cleaned.Removed[0].Objects))
	return nil
}
