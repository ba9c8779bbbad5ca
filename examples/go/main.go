// Command chat streams a chat with an image and a tool call from qwen-serve
// and prints the events.
//
// Generate the stubs first (from the repository root, needs buf.build):
//
//	buf generate --template examples/go/buf.gen.yaml -o examples/go --path protos/qwen_serve/api/v1
//	cd examples/go && go mod tidy && go run . -target 127.0.0.1:50051 -image cat.png
//
// This example is not compiled by the project's CI (no Go toolchain and no
// buf.build access on the development machines); docs/api.md says so.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	apiv1 "example.com/qwen-serve-go/gen/qwen_serve/api/v1"
)

const weatherSchema = `{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}`

func main() {
	target := flag.String("target", "127.0.0.1:50051", "router host:port")
	apiKey := flag.String("api-key", os.Getenv("QWEN_SERVE_API_KEY"), "sent as authorization: Bearer KEY")
	useTLS := flag.Bool("tls", false, "TLS with the system roots")
	imagePath := flag.String("image", "", "image file (PNG, JPEG, WebP)")
	prompt := flag.String("prompt", "What is the weather like in the city in this picture?", "user message")
	flag.Parse()

	creds := insecure.NewCredentials()
	if *useTLS {
		creds = credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12})
	}
	conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(creds))
	if err != nil {
		log.Fatalf("dial %s: %v", *target, err)
	}
	defer conn.Close()
	client := apiv1.NewInferenceClient(conn)

	// The deadline rides on the call; the server aborts the request when it passes.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if *apiKey != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*apiKey)
	}

	content := []*apiv1.ContentPart{{Part: &apiv1.ContentPart_Text{Text: *prompt}}}
	if *imagePath != "" {
		data, err := os.ReadFile(*imagePath)
		if err != nil {
			log.Fatal(err)
		}
		img := &apiv1.ContentPart{Part: &apiv1.ContentPart_Image{Image: &apiv1.Image{Source: &apiv1.Image_Data{Data: data}}}}
		content = append([]*apiv1.ContentPart{img}, content...)
	}
	request := &apiv1.ChatRequest{
		Messages: []*apiv1.Message{{Role: apiv1.Role_ROLE_USER, Content: content}},
		Tools: []*apiv1.Tool{{
			Name:                 "get_weather",
			Description:          "Current weather for a city",
			ParametersJsonSchema: weatherSchema,
		}},
		EnableThinking: proto.Bool(false),
		Sampling:       &apiv1.SamplingParams{MaxTokens: proto.Uint32(256)},
	}

	stream, err := client.Chat(ctx, request)
	if err != nil {
		log.Fatalf("chat: %v", err)
	}
	for {
		event, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			// A status before Started: INVALID_ARGUMENT names the field, UNAVAILABLE may be retried.
			s := status.Convert(err)
			log.Fatalf("error %s: %s", s.Code(), s.Message())
		}
		printEvent(event)
	}
}

func printEvent(event *apiv1.ChatEvent) {
	switch e := event.Event.(type) {
	case *apiv1.ChatEvent_Started:
		fmt.Printf("started request_id=%s model=%s\n", e.Started.RequestId, e.Started.Model)
	case *apiv1.ChatEvent_Delta:
		fmt.Print(e.Delta.Reasoning, e.Delta.Content)
		for _, call := range e.Delta.ToolCalls {
			if call.Name != "" {
				fmt.Printf("\ntool call %s ", call.Name)
			}
			fmt.Print(call.ArgumentsFragment)
		}
	case *apiv1.ChatEvent_Finished:
		fmt.Printf("\nfinished choice=%d reason=%s\n", e.Finished.Index, e.Finished.Reason)
		for _, call := range e.Finished.ToolCalls {
			fmt.Printf("  %s(%s) id=%s\n", call.Name, call.ArgumentsJson, call.Id)
		}
	case *apiv1.ChatEvent_Usage:
		fmt.Printf("usage prompt=%d completion=%d reasoning=%d\n",
			e.Usage.PromptTokens, e.Usage.CompletionTokens, e.Usage.ReasoningTokens)
	case *apiv1.ChatEvent_Error:
		fmt.Printf("\nerror code=%d retryable=%t: %s\n", e.Error.Code, e.Error.Retryable, e.Error.Message)
	}
}
