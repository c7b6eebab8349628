"""The ``devices`` context: live pump, tank and device-line state from station telemetry
(MQTT), with a bounded history and alarms, at head office."""
