// Java example client of qwen-serve. Generate the stubs first (repository root, needs buf.build):
//   buf generate --template examples/java/buf.gen.yaml -o examples/java --path protos/qwen_serve/api/v1
// then: cd examples/java && gradle run --args="127.0.0.1:50051 cat.png"
// Not compiled by the project's CI (no Maven Central or buf.build access on the development machines).
plugins {
    application
    java
}

repositories { mavenCentral() }

val grpcVersion = "1.73.0"      // keep in step with buf.build/grpc/java in buf.gen.yaml
val protobufVersion = "4.31.1"  // keep in step with buf.build/protocolbuffers/java (v31.1)

dependencies {
    implementation("io.grpc:grpc-netty-shaded:$grpcVersion")
    implementation("io.grpc:grpc-protobuf:$grpcVersion")
    implementation("io.grpc:grpc-stub:$grpcVersion")
    implementation("com.google.protobuf:protobuf-java:$protobufVersion")
    compileOnly("org.apache.tomcat:annotations-api:6.0.53") // @Generated in grpc-java stubs
}

java { toolchain { languageVersion.set(JavaLanguageVersion.of(17)) } }

application { mainClass.set("dev.qwenserve.example.Chat") }
