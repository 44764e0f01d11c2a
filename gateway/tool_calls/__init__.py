"""Tool calling in the gateway: the request side (tools, tool_choice) and the output parsers."""
