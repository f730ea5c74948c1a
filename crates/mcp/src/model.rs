//! The MCP types this client sends and reads: our own, not `rmcp`'s.
//!
//! Only what a client needs is typed: lifecycle (initialize, `server/discover`), tools,
//! resources, prompts. Members this client does not interpret (annotations, icons, `_meta`,
//! schemas) stay `serde_json::Value`, so a server that sends more than we know is still read,
//! and unknown content block types become [`Content::Unknown`] instead of an error.
//! Why own types and not `rmcp::model`: see docs/mcp.md ("own types").

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Protocol revision 2025-03-26 (first with Streamable HTTP).
pub const V_2025_03_26: &str = "2025-03-26";
/// Protocol revision 2025-06-18.
pub const V_2025_06_18: &str = "2025-06-18";
/// Protocol revision 2025-11-25 (the last with `initialize` and sessions).
pub const V_2025_11_25: &str = "2025-11-25";
/// Protocol revision 2026-07-28 (stateless: no initialize, per-request `_meta`).
pub const V_2026_07_28: &str = "2026-07-28";
/// Legacy revisions this client accepts from `initialize`, newest first.
pub const LEGACY_VERSIONS: &[&str] = &[V_2025_11_25, V_2025_06_18, V_2025_03_26, "2024-11-05"];
/// Modern revisions this client speaks, newest first.
pub const MODERN_VERSIONS: &[&str] = &[V_2026_07_28];

/// `_meta` key of the protocol version (2026-07-28).
pub const META_PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key of the client info (2026-07-28).
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key of the client capabilities (2026-07-28).
pub const META_CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";

/// Which protocol generation a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Era {
    /// 2025-03-26 .. 2025-11-25: `initialize` handshake, sessions.
    Legacy,
    /// 2026-07-28 and later: stateless, per-request metadata.
    Modern,
}

/// True when `version` is a modern (stateless, no initialize) revision.
pub fn is_modern(version: &str) -> bool {
    // Revisions are dates: compare as strings.
    version >= V_2026_07_28
}

/// Name and version of a client or server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Implementation {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Other members (title, icons, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Implementation {
    /// vmcp's own client info.
    pub fn vmcp() -> Self {
        Implementation {
            name: "vmcp".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extra: Map::new(),
        }
    }
}

/// `initialize` params.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializeParams<'a> {
    /// Requested protocol version.
    pub protocol_version: &'a str,
    /// Client capabilities.
    pub capabilities: &'a Value,
    /// Client info.
    pub client_info: &'a Implementation,
}

/// What the server told us about itself, from `initialize` or `server/discover`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    /// The protocol version in use (set by us for `server/discover`).
    #[serde(default)]
    pub protocol_version: String,
    /// Versions the server supports (`server/discover` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supported_versions: Vec<String>,
    /// Server capabilities.
    #[serde(default)]
    pub capabilities: Value,
    /// Server name and version.
    #[serde(default)]
    pub server_info: Option<Implementation>,
    /// Usage hints for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
}

/// A tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tool {
    /// Name.
    pub name: String,
    /// Human-readable title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    #[serde(default)]
    pub input_schema: Value,
    /// Other members (outputSchema, annotations, icons, _meta).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `tools/list` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListToolsResult {
    /// The tools of this page.
    pub tools: Vec<Tool>,
    /// Cursor of the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `tools/call` params.
#[derive(Debug, Clone, Serialize)]
pub struct CallToolParams<'a> {
    /// Tool name.
    pub name: &'a str,
    /// Arguments (a JSON object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<&'a Value>,
}

/// A content block of a tool result or prompt message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image, base64.
    Image {
        /// Base64 data.
        data: String,
        /// MIME type.
        #[serde(rename = "mimeType")]
        mime_type: String,
    },
    /// Audio, base64.
    Audio {
        /// Base64 data.
        data: String,
        /// MIME type.
        #[serde(rename = "mimeType")]
        mime_type: String,
    },
    /// A link to a resource.
    ResourceLink {
        /// URI.
        uri: String,
        /// Name.
        #[serde(default)]
        name: String,
    },
    /// An embedded resource.
    Resource {
        /// The resource contents.
        resource: Value,
    },
    /// A content type this client does not know.
    #[serde(other)]
    Unknown,
}

impl Content {
    /// The text of a text block.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Content::Text { text } => Some(text),
            _ => None,
        }
    }
}

/// `tools/call` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallToolResult {
    /// Content blocks.
    #[serde(default)]
    pub content: Vec<Content>,
    /// Structured result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured_content: Option<Value>,
    /// True when the tool itself failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
}

impl CallToolResult {
    /// True when the tool reported an error.
    pub fn is_error(&self) -> bool {
        self.is_error == Some(true)
    }
}

/// A resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    /// URI.
    pub uri: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// MIME type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// Other members.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `resources/list` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListResourcesResult {
    /// The resources of this page.
    pub resources: Vec<Resource>,
    /// Cursor of the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One item of `resources/read`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceContents {
    /// URI.
    pub uri: String,
    /// MIME type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    /// Text contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Binary contents, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
}

/// `resources/read` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadResourceResult {
    /// Contents.
    pub contents: Vec<ResourceContents>,
}

/// A prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Arguments.
    #[serde(default)]
    pub arguments: Vec<Value>,
}

/// `prompts/list` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListPromptsResult {
    /// The prompts of this page.
    pub prompts: Vec<Prompt>,
    /// Cursor of the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A prompt message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptMessage {
    /// `user` or `assistant`.
    pub role: String,
    /// Content.
    pub content: Content,
}

/// `prompts/get` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetPromptResult {
    /// Description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Messages.
    pub messages: Vec<PromptMessage>,
}

/// The `resultType` member of a 2026-07-28 result.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ResultTypeProbe<'a> {
    #[serde(borrow, default)]
    pub result_type: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_call_tool_result_with_unknown_blocks() {
        let r: CallToolResult = serde_json::from_str(
            r#"{"content":[{"type":"text","text":"hi"},{"type":"hologram","x":1},
               {"type":"image","data":"AA==","mimeType":"image/png"}],"isError":false}"#,
        )
        .unwrap();
        assert_eq!(r.content[0].as_text(), Some("hi"));
        assert_eq!(r.content[1], Content::Unknown);
        assert!(r.content[2].as_text().is_none());
        assert!(!r.is_error());
    }

    #[test]
    fn versions() {
        assert!(is_modern(V_2026_07_28));
        assert!(!is_modern(V_2025_11_25));
        let info: ServerInfo = serde_json::from_str(
            r#"{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"s","version":"1","title":"t"}}"#,
        )
        .unwrap();
        assert_eq!(info.server_info.unwrap().extra["title"], "t");
    }
}
