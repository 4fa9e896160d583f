// Renders an Ollama TEMPLATE the way Ollama does: Go's text/template, executed over a value whose Messages are
// {Role, Content} structs (ollama/template's Values and api.Message). Reads {"template", "messages"} as JSON on
// standard input and writes the rendered prompt to standard output.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

func main() {
	var input struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(input.Template))
	if err := tmpl.Execute(os.Stdout, Values{Messages: input.Messages}); err != nil {
		panic(err)
	}
}
