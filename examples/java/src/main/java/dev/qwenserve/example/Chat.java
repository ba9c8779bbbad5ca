package dev.qwenserve.example;

import com.google.protobuf.ByteString;
import dev.qwenserve.v1.ChatEvent;
import dev.qwenserve.v1.ChatRequest;
import dev.qwenserve.v1.ContentPart;
import dev.qwenserve.v1.Image;
import dev.qwenserve.v1.InferenceGrpc;
import dev.qwenserve.v1.Role;
import dev.qwenserve.v1.SamplingParams;
import dev.qwenserve.v1.Tool;
import dev.qwenserve.v1.ToolCall;
import dev.qwenserve.v1.ToolCallDelta;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Iterator;
import java.util.concurrent.TimeUnit;

/** Streams a chat with an image and a tool call from qwen-serve and prints the events. */
public final class Chat {
  private static final String WEATHER_SCHEMA =
      "{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}";

  public static void main(String[] args) throws Exception {
    String target = args.length > 0 ? args[0] : "127.0.0.1:50051";
    String imagePath = args.length > 1 ? args[1] : null;
    ManagedChannel channel =
        Grpc.newChannelBuilder(target, InsecureChannelCredentials.create()).build();
    try {
      // The deadline rides on the call; the server aborts the request when it passes.
      InferenceGrpc.InferenceBlockingStub stub =
          InferenceGrpc.newBlockingStub(channel).withDeadlineAfter(120, TimeUnit.SECONDS);
      String apiKey = System.getenv("QWEN_SERVE_API_KEY");
      if (apiKey != null && !apiKey.isEmpty()) {
        Metadata headers = new Metadata();
        headers.put(
            Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + apiKey);
        stub = stub.withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers));
      }

      dev.qwenserve.v1.Message.Builder user =
          dev.qwenserve.v1.Message.newBuilder().setRole(Role.ROLE_USER);
      if (imagePath != null) {
        ByteString data = ByteString.copyFrom(Files.readAllBytes(Path.of(imagePath)));
        user.addContent(ContentPart.newBuilder().setImage(Image.newBuilder().setData(data)));
      }
      user.addContent(
          ContentPart.newBuilder()
              .setText("What is the weather like in the city in this picture?"));
      ChatRequest request =
          ChatRequest.newBuilder()
              .addMessages(user)
              .addTools(
                  Tool.newBuilder()
                      .setName("get_weather")
                      .setDescription("Current weather for a city")
                      .setParametersJsonSchema(WEATHER_SCHEMA))
              .setEnableThinking(false)
              .setSampling(SamplingParams.newBuilder().setMaxTokens(256))
              .build();

      Iterator<ChatEvent> events = stub.chat(request);
      while (events.hasNext()) {
        print(events.next());
      }
    } catch (StatusRuntimeException e) {
      // A status before Started: INVALID_ARGUMENT names the field, UNAVAILABLE may be retried.
      System.err.println("error " + e.getStatus().getCode() + ": " + e.getStatus().getDescription());
      System.exit(1);
    } finally {
      channel.shutdownNow();
    }
  }

  private static void print(ChatEvent event) {
    switch (event.getEventCase()) {
      case STARTED -> System.out.println("started request_id=" + event.getStarted().getRequestId());
      case DELTA -> {
        System.out.print(event.getDelta().getReasoning() + event.getDelta().getContent());
        for (ToolCallDelta call : event.getDelta().getToolCallsList()) {
          if (!call.getName().isEmpty()) {
            System.out.print("\ntool call " + call.getName() + " ");
          }
          System.out.print(call.getArgumentsFragment());
        }
      }
      case FINISHED -> {
        System.out.println("\nfinished reason=" + event.getFinished().getReason());
        for (ToolCall call : event.getFinished().getToolCallsList()) {
          System.out.println("  " + call.getName() + "(" + call.getArgumentsJson() + ") id=" + call.getId());
        }
      }
      case USAGE -> System.out.println(
          "usage prompt=" + event.getUsage().getPromptTokens()
              + " completion=" + event.getUsage().getCompletionTokens());
      case ERROR -> System.out.println(
          "\nerror code=" + event.getError().getCode() + ": " + event.getError().getMessage());
      case EVENT_NOT_SET -> { }
    }
  }
}
