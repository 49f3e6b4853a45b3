"""Example inputs shipped with the CLI (package data: `puremesh credit --example` reads them)."""
