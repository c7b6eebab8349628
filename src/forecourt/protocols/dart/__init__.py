"""Wayne DART (Dart Pump Interface rev 2.11): line codec, application codec, simulator, driver."""
